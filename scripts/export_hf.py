"""Export a checkpoint as a Hugging Face transformers directory.

    python scripts/export_hf.py runs/2026-11-26/08-00-00 hf/my-model          # a run's latest checkpoint
    python scripts/export_hf.py runs/.../checkpoints/step_00001000 hf/my-model

OUT_DIR gets config.json, model.safetensors, generation_config.json and the tokenizer's files, so that
`AutoModelForCausalLM.from_pretrained(OUT_DIR)` and `AutoTokenizer.from_pretrained(OUT_DIR)` load it
offline. The GPT-2 style (layernorm, learned positions, gelu or relu2) becomes GPT2LMHeadModel, the Llama
style (rmsnorm, rope, swiglu) LlamaForCausalLM, and the Llama style with qk_norm Qwen3ForCausalLM
(models/hf.py); any other combination is refused in one line that names the nearest one that exports.
Whole and sharded (FSDP) checkpoints both export. BPE and Hugging Face tokenizers are written as they
are; byte and char tokenizers become a PreTrainedTokenizerFast, checked id by id against ours (a char
tokenizer's exported form drops characters outside its vocabulary, where ours refuses them).
See docs/export.md for evaluation (lm-eval) and the Hub.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from models.hf import export_model, style_of
from trainer import checkpoint as ckpt_io
from trainer.data.tokenizers import EOT, ByteTokenizer, CharTokenizer, load_tokenizer
from trainer.errors import ConfigError, exit_with_error


def hf_tokenizer(tokenizer):
    """A transformers tokenizer that maps text to the same ids as ours: the Hugging Face one itself, our
    BPE wrapped, byte and char built as a `tokenizers` BPE without merges over a fixed vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if isinstance(tokenizer, ByteTokenizer):  # GPT-2's byte-to-character table names the 256 byte tokens
        table = bytes_to_unicode()
        backend = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
    elif isinstance(tokenizer, CharTokenizer):  # one token per character, in our order
        backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(tokenizer.chars)}, merges=[]))
        backend.decoder = decoders.Fuse()
    elif tokenizer.kind == "bpe":
        backend = tokenizer.backend
    else:  # tokenizer=hf: already a transformers tokenizer
        return tokenizer.backend
    eot = {"eos_token": EOT, "bos_token": EOT} if tokenizer.eot_id is not None else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **eot)


def check_round_trip(ours, theirs) -> None:
    """ValueError unless the exported tokenizer decodes every id as ours does, encodes back every id whose
    text ours encodes back, and encodes a text of every such token (and some non-ASCII text) the same."""
    texts = []
    for i in range(ours.vocab_size):
        text, got = ours.decode([i]), theirs.decode([i])
        if got != text:
            raise ValueError(f"id {i} decodes to {got!r} there, {text!r} here")
        if ours.encode_batch([text])[0].tolist() == [i]:
            texts.append(text)
            if (back := theirs.encode(text, add_special_tokens=False)) != [i]:
                raise ValueError(f"{text!r} (id {i}) encodes to {back} there")
    probe = "".join(texts)
    try:
        probe += "\nnaïve café — 你好 🙂"
        expected = ours.encode_batch([probe])[0].tolist()
    except ValueError:  # a char vocabulary without these characters
        probe = "".join(texts)
        expected = ours.encode_batch([probe])[0].tolist()
    if theirs.encode(probe, add_special_tokens=False) != expected:
        raise ValueError("a text of every token encodes otherwise there")


def export(ckpt: Path, out: Path) -> tuple[str, int]:
    """Write the checkpoint as a transformers directory at `out` (all at once: it appears complete or not at
    all); return the transformers class and the number of parameters."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not empty: choose a new directory")
    model = ckpt_io.load_model(ckpt)
    style_of(model.config)  # a combination transformers has no class for: refused before any work
    tokenizer = load_tokenizer(ckpt / "tokenizer")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf_tokenizer(tokenizer).save_pretrained(str(tmp))
        try:  # what we built ourselves is checked as the user will load it
            if isinstance(tokenizer, (ByteTokenizer, CharTokenizer)):
                check_round_trip(tokenizer, AutoTokenizer.from_pretrained(str(tmp)))
        except ValueError as e:
            raise ConfigError(
                f"the {tokenizer.identity} tokenizer does not survive as a transformers tokenizer ({e}): export "
                f"the weights alone with scripts/export.py, or train with tokenizer=bpe"
            ) from None
        hf_class = export_model(model, tmp, bos_id=tokenizer.eot_id, eos_id=tokenizer.eot_id)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return hf_class, model.num_params()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    parser.add_argument("out_dir", type=Path, help="the transformers directory to write (new or empty)")
    args = parser.parse_args(argv)
    try:
        ckpt = ckpt_io.find_checkpoint(args.checkpoint, what="checkpoint")
        hf_class, n = export(ckpt, args.out_dir)
    except (ConfigError, OSError, ValueError) as e:
        exit_with_error(str(e))
    kind = "sharded" if ckpt_io.is_sharded(ckpt) else "whole"
    print(f"wrote {args.out_dir}: {hf_class}, {n / 1e6:.2f}M parameters, from the {kind} checkpoint {ckpt}")


if __name__ == "__main__":
    main()
