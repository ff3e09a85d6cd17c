#!/usr/bin/env bash
# The GPU check: one command, at most ~8 minutes on one H100-class GPU, one JSON line per check.
#
#   bash scripts/gpu_check.sh              # run every check (no CUDA: one line saying so, exit 0)
#   bash scripts/gpu_check.sh --dry-run    # print each check's command (NAME<TAB>COMMAND), run nothing
#
# Checks, in order, each under its own time limit (480 s in all, so one that hangs cannot take the others' time;
# the checks share the compile cache in data.cache_dir, so gpt2_124m compiles bench_gpt2's graphs from it):
#   bench_gpt2        scripts/bench.py on GPT-2 124M (seq 1024, bf16, compiled): tokens/s and MFU (target >= 0.5)
#   flash_sdpa        the flash kernel runs under the model's bf16 autocast (profiler kernel names)
#   fp16_gradscaler   30 steps in fp16: finite, falling losses, and the GradScaler's scale in the checkpoint
#   ddp_nccl          torchrun (python -m torch.distributed.run), world size 1, distributed=ddp over NCCL
#   fsdp_nccl         the same with distributed=fsdp
#   gpt2_124m_resume  100 steps of +experiment=gpt2_124m with a checkpoint at 50, then a resume from it
#                     whose losses match the uninterrupted run's (bf16 on a GPU: within 2%)
#   optimizers        scripts/bench_optimizers.py on CUDA: each optimizer's step against fused AdamW
# The machine has no network: the embedded corpus (data=stdlib) with the byte tokenizer and
# model.vocab_size=50304, which is GPT-2 124M's shape and FLOPs (its tokenizer would need the hub).
#
# On this workplace's lent GPU machine (its image has torch 2.11, transformers, tokenizers, safetensors, numpy,
# tqdm, but not hydra-core, omegaconf, schedulefree, pytorch_optimizer, wandb or datasets). The check needs
# only the first four (+ omegaconf's antlr4 runtime): W&B is off (logger=jsonl) and data=hf is not used; a
# tiny run here with wandb, datasets, optuna, submitit, scipy and matplotlib blocked from import trained.
#   here, once, in the repository root (/.whl/ is git-ignored; these five wheels are under 1 MB):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl hydra-core==1.3.2 omegaconf==2.3.0 schedulefree==1.4.1 pytorch_optimizer==4.1.0
#     python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3     # an sdist only: built here
#     (wandb and datasets, should a check need them: add wandb==0.19.11 datasets==3.6.0 dill==0.3.8
#      multiprocess==0.70.16 and wandb's own requirements to the download)
#   there (the device tool: carry [".whl"], one command, timeout_s 600):
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && bash scripts/gpu_check.sh
#   (its run directories, GPT-2 checkpoints included, stay in /tmp/gpu_check.* there: the JSON lines are the result)
# Not yet run: no GPU was lent while it was written (docs/performance.md).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${GPU_CHECK_DIR:-/tmp/gpu_check.XXXXXX}   # a new directory per run (mktemp), unless GPU_CHECK_DIR names one
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

GPT2="model=gpt2 model.vocab_size=50304 tokenizer=byte"    # GPT-2 124M without the hub
RUN="logger=jsonl trainer.progress=false trainer.device=cuda"
SMALL="trainer.max_steps=20 trainer.eval_interval=20 trainer.eval_steps=5 trainer.log_interval=5 trainer.sample_tokens=0"
G124="+experiment=gpt2_124m tokenizer=byte model.vocab_size=50304 trainer.max_steps=100 trainer.ckpt_interval=50"
G124="$G124 trainer.eval_interval=50 trainer.eval_steps=10 trainer.log_interval=10 trainer.sample_tokens=0 $RUN"

declare -a NAMES COMMANDS LIMITS
add() { NAMES+=("$1"); LIMITS+=("$2"); COMMANDS+=("$3"); }
add bench_gpt2 100 "$PY scripts/bench.py $GPT2 $RUN trainer.precision=bf16 trainer.compile=true trainer.micro_batch_size=16 --steps 20 --warmup 5"
add flash_sdpa 30 "$PY scripts/gpu_check.py flash"
add fp16_gradscaler 50 "$PY train.py $GPT2 $RUN $SMALL trainer.max_steps=30 trainer.precision=fp16 trainer.compile=false trainer.micro_batch_size=8 hydra.run.dir=$OUT/fp16"
add ddp_nccl 40 "$PY -m torch.distributed.run --standalone --nproc_per_node=1 train.py $RUN $SMALL distributed=ddp distributed.backend=nccl hydra.run.dir=$OUT/ddp"
add fsdp_nccl 40 "$PY -m torch.distributed.run --standalone --nproc_per_node=1 train.py $RUN $SMALL distributed=fsdp distributed.backend=nccl hydra.run.dir=$OUT/fsdp"
add gpt2_124m 80 "$PY train.py $G124 hydra.run.dir=$OUT/g124"
add gpt2_124m_resume 50 "$PY train.py $G124 trainer.resume=$OUT/g124/checkpoints/step_00000050 hydra.run.dir=$OUT/g124r"
add optimizers 90 "$PY scripts/bench_optimizers.py --device cuda --model gpt2 --fused auto --steps 10 --warmup 3"

if [ $DRY = 1 ]; then
    for i in "${!NAMES[@]}"; do printf '%s\t%s\n' "${NAMES[$i]}" "${COMMANDS[$i]}"; done
    exit 0
fi
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "{\"check\": \"cuda\", \"ok\": null, \"skipped\": \"no CUDA device visible to $PY: nothing to check\"}"
    exit 0
fi

if [ -z "${GPU_CHECK_DIR:-}" ]; then
    fresh=$(mktemp -d /tmp/gpu_check.XXXXXX)
    for i in "${!COMMANDS[@]}"; do COMMANDS[$i]=${COMMANDS[$i]//$OUT/$fresh}; done
    OUT=$fresh
fi
mkdir -p "$OUT"
failed=0
for i in "${!NAMES[@]}"; do
    name=${NAMES[$i]}
    start=$(date +%s)
    timeout "${LIMITS[$i]}" bash -c "${COMMANDS[$i]}" >"$OUT/$name.out" 2>"$OUT/$name.err"
    rc=$?
    $PY scripts/gpu_check.py report "$name" "$rc" "$(($(date +%s) - start))" "$OUT" || failed=1
done
exit $failed
