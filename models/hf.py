"""MiniGPT to and from Hugging Face transformers: which transformers class a config is, its weight names and
layouts, and reading a transformers directory. Nothing read here runs code: config.json is parsed as JSON,
weights come only from safetensors, a directory that asks for custom code (`auto_map`) is refused.

  style  transformers class   MiniGPT fields
  gpt2   GPT2LMHeadModel      norm=layernorm, pos_emb=learned, mlp=gelu|relu2 (bias=false: zero biases)
  llama  LlamaForCausalLM     norm=rmsnorm, pos_emb=rope, mlp=swiglu
  qwen3  Qwen3ForCausalLM     the llama style with qk_norm=true and bias=false

Two layouts differ from ours. GPT-2's Conv1D stores a weight as (in, out), the transpose of nn.Linear's.
Our attention's c_attn is the q, k and v projections stacked; Llama splits them. RoPE needs no change:
ours rotates the pairs (x[i], x[i + D/2]), exactly what transformers' `rotate_half` does (checked in
transformers' modeling_llama.py; Meta's original checkpoints pair neighbours and need a permutation, ours
do not), and the frequencies are theta^(-2i/D) in both.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from models.minigpt import GPTConfig, MiniGPT


@dataclass(frozen=True)
class Style:
    hf_class: str  # the transformers model class
    model_type: str  # config.json's model_type
    needs: dict  # MiniGPT field -> the values this class can express (the first is what to change it to)


STYLES = {
    "gpt2": Style("GPT2LMHeadModel", "gpt2", {"norm": ("layernorm",), "pos_emb": ("learned",),
                                             "mlp": ("gelu", "relu2"), "qk_norm": (False,), "logit_softcap": (0.0,)}),
    "llama": Style("LlamaForCausalLM", "llama", {"norm": ("rmsnorm",), "pos_emb": ("rope",), "mlp": ("swiglu",),
                                                 "qk_norm": (False,), "logit_softcap": (0.0,)}),
    "qwen3": Style("Qwen3ForCausalLM", "qwen3", {"norm": ("rmsnorm",), "pos_emb": ("rope",), "mlp": ("swiglu",),
                                                 "qk_norm": (True,), "bias": (False,), "logit_softcap": (0.0,)}),
}  # fmt: skip


def style_of(cfg: GPTConfig) -> str:
    """The style this architecture exports as; ValueError naming the nearest one that exports otherwise."""
    changes = {name: [f"model.{k}={_yaml(v[0])}" for k, v in s.needs.items() if getattr(cfg, k) not in v]
               for name, s in STYLES.items()}  # fmt: skip
    nearest = min(changes, key=lambda name: len(changes[name]))  # the first of equals: gpt2, llama, qwen3
    if not changes[nearest]:
        return nearest
    have = ", ".join(f"{k}={_yaml(getattr(cfg, k))}" for k in ("norm", "mlp", "pos_emb", "qk_norm", "bias"))
    softcap = f", logit_softcap={cfg.logit_softcap}" if cfg.logit_softcap else ""
    raise ValueError(
        f"this model ({have}{softcap}) has no transformers equivalent; the nearest that exports is "
        f"{STYLES[nearest].hf_class}, trained with {' '.join(changes[nearest])}"
    )


def _yaml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# ---- weight names: ours -> transformers' (several names: our tensor is theirs stacked along dim 0) ----------

_GPT2_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_LLAMA_BLOCK = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_proj": "self_attn.o_proj",
                "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm", "mlp.c_gate": "mlp.gate_proj",
                "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}  # fmt: skip
_LLAMA_TOP = {"wte": "model.embed_tokens", "ln_f": "model.norm", "lm_head": "lm_head"}
_BLOCK_NAME = re.compile(r"^h\.(\d+)\.(.+)\.(weight|bias)$")


def hf_names(name: str, style: str) -> tuple[tuple[str, ...], bool]:
    """transformers' names for our tensor `name`, and whether it is stored transposed (GPT-2's Conv1D)."""
    block = _BLOCK_NAME.match(name)
    if style == "gpt2":
        theirs = name if name.startswith("lm_head.") else f"transformer.{name}"
        return (theirs,), block is not None and f"{block.group(2)}.{block.group(3)}" in _GPT2_TRANSPOSED
    if block is None:
        module, kind = name.rsplit(".", 1)
        return (f"{_LLAMA_TOP[module]}.{kind}",), False
    i, module, kind = block.groups()
    prefix = f"model.layers.{i}"
    if module == "attn.c_attn":
        return tuple(f"{prefix}.self_attn.{p}_proj.{kind}" for p in "qkv"), False
    return (f"{prefix}.{_LLAMA_BLOCK[module]}.{kind}",), False


def to_hf_state(model: MiniGPT, style: str) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names and layouts (a tied head appears under both names)."""
    out = {}
    for name, tensor in model.state_dict().items():
        names, transposed = hf_names(name, style)
        for theirs, part in zip(names, tensor.chunk(len(names), dim=0), strict=True):
            out[theirs] = (part.t() if transposed else part).contiguous()
    return out


def from_hf_state(tensors: dict[str, torch.Tensor], model: MiniGPT, style: str, where: str) -> dict[str, torch.Tensor]:
    """transformers' tensors under our names and layouts, shapes checked against `model`."""
    ours = {}
    for name, mine in model.state_dict().items():
        names, transposed = hf_names(name, style)
        if name == "lm_head.weight" and model.config.tie_embeddings and names[0] not in tensors:
            names = hf_names("wte.weight", style)[0]  # a tied head is often stored once, as the embedding
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"{where} has no tensor {missing[0]!r}: not a {STYLES[style].hf_class} of this shape")
        parts = [tensors[n].t() if transposed else tensors[n] for n in names]
        tensor = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        if tensor.shape != mine.shape:
            raise ValueError(f"{where}: {names[0]} has shape {tuple(tensors[names[0]].shape)}, which does not fit "
                             f"our {name} {tuple(mine.shape)}")  # fmt: skip
        ours[name] = tensor.to(mine.dtype)
    return ours


# ---- export ---------------------------------------------------------------------------------------------------


def hf_config(cfg: GPTConfig, style: str, bos_id: int | None, eos_id: int | None):
    """The transformers config of this architecture (special token ids from the tokenizer, or None)."""
    import transformers

    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": bos_id,
              "eos_token_id": eos_id, "pad_token_id": None}  # fmt: skip
    if style == "gpt2":
        return transformers.GPT2Config(
            n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
            n_inner=cfg.mlp_width(), activation_function="gelu_new" if cfg.mlp == "gelu" else "relu2",
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, layer_norm_epsilon=cfg.norm_eps,
            **common,
        )  # fmt: skip
    llama_like = dict(
        hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_width(), num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head, head_dim=cfg.n_embd // cfg.n_head,
        hidden_act="silu", max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, attention_bias=cfg.bias, attention_dropout=cfg.dropout, **common,
    )  # fmt: skip
    if style == "llama":
        return transformers.LlamaConfig(mlp_bias=cfg.bias, **llama_like)
    return transformers.Qwen3Config(use_sliding_window=False, **llama_like)


def export_model(model: MiniGPT, out_dir: Path, bos_id: int | None = None, eos_id: int | None = None) -> str:
    """Write `model` as a transformers directory (config.json, model.safetensors, generation_config.json);
    return the class name. The weights go through the transformers class itself, loaded strictly, so a
    name or shape that does not fit fails here rather than in the user's hands."""
    import transformers

    style = style_of(model.config)
    config = hf_config(model.config, style, bos_id, eos_id)
    hf = getattr(transformers, STYLES[style].hf_class)(config)
    state = to_hf_state(model, style)
    for name, tensor in hf.state_dict().items():  # GPT-2 always has biases: ours are zero when bias=false
        if name not in state and style == "gpt2" and not model.config.bias and name.endswith(".bias"):
            state[name] = torch.zeros_like(tensor)
    hf.load_state_dict(state, strict=True)
    hf.generation_config.bos_token_id, hf.generation_config.eos_token_id = bos_id, eos_id
    hf.save_pretrained(str(out_dir))
    return STYLES[style].hf_class


# ---- import ---------------------------------------------------------------------------------------------------

PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read as JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def read_architecture(path: str | Path) -> tuple[str, dict]:
    """(style, MiniGPT fields) of a transformers directory's config.json; ValueError, one line, for a
    directory we cannot represent exactly or that asks for code to be run."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json: give a directory written by transformers' save_pretrained")
    c = _read_json(path / "config.json")
    tokenizer_config = path / "tokenizer_config.json"
    if "auto_map" in c or (tokenizer_config.is_file() and "auto_map" in _read_json(tokenizer_config)):
        raise ValueError(f"{path} asks for its own code (auto_map, trust_remote_code): refused; nothing was run")
    kind = c.get("model_type")
    if kind not in ("gpt2", "llama", "qwen3"):
        raise ValueError(f"{path} holds a {kind!r} model; model.init_from reads gpt2, llama and qwen3 directories")
    try:
        return kind, _gpt2_fields(c, path) if kind == "gpt2" else _llama_fields(c, path)
    except KeyError as e:
        raise ValueError(f"{path}/config.json has no {e.args[0]!r}") from None


def init_fields(path: str | Path, cfg: GPTConfig) -> dict:
    """The architecture fields that starting from the transformers directory `path` sets. A field that
    `cfg` sets to neither its default nor the directory's value is a mismatch: ValueError naming each."""
    _, fields = read_architecture(path)
    fields["logit_softcap"] = 0.0  # transformers' GPT-2 and Llama have none
    default = GPTConfig()
    clash = [f"model.{k}={_yaml(getattr(cfg, k))} (it has {_yaml(v)})" for k, v in fields.items()
             if getattr(cfg, k) not in (v, getattr(default, k))]  # fmt: skip
    if clash:
        raise ValueError(f"{path} does not match {'; '.join(clash)}: drop these settings, the architecture "
                         "comes from the directory")  # fmt: skip
    return fields


def _refuse(path: Path, what: str) -> None:
    raise ValueError(f"{path}/config.json: {what}, which MiniGPT does not have")


def _gpt2_fields(c: dict, path: Path) -> dict:
    activation = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu2": "relu2"}.get(c.get("activation_function"))
    if activation is None:
        _refuse(path, f"activation_function={c.get('activation_function')!r} (ours: gelu_new, relu2)")
    scaled = c.get("scale_attn_weights", True) and not c.get("scale_attn_by_inverse_layer_idx")
    if not scaled or c.get("add_cross_attention"):
        _refuse(path, "attention scaled otherwise than by 1/sqrt(head size), or cross-attention")
    return {"vocab_size": c["vocab_size"], "block_size": c.get("n_positions", 1024), "n_layer": c["n_layer"],
            "n_head": c["n_head"], "n_embd": c["n_embd"], "norm": "layernorm",
            "norm_eps": c.get("layer_norm_epsilon", 1e-5), "mlp": activation, "mlp_hidden": c.get("n_inner"),
            "bias": True, "pos_emb": "learned", "qk_norm": False,
            "tie_embeddings": c.get("tie_word_embeddings", True)}  # fmt: skip


def _llama_fields(c: dict, path: Path) -> dict:
    heads, width = c["num_attention_heads"], c["hidden_size"]
    if c.get("hidden_act", "silu") != "silu":
        _refuse(path, f"hidden_act={c.get('hidden_act')!r} (ours: silu)")
    if (c.get("num_key_value_heads") or heads) != heads:
        _refuse(path, f"grouped-query attention (num_key_value_heads={c['num_key_value_heads']}, {heads} heads)")
    if (c.get("head_dim") or width // heads) != width // heads:
        _refuse(path, f"head_dim={c['head_dim']} other than hidden_size / num_attention_heads")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}  # transformers 5 / 4
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        _refuse(path, f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r}")
    if (c.get("pretraining_tp") or 1) != 1 or c.get("use_sliding_window"):
        _refuse(path, "pretraining_tp > 1 or sliding-window attention")
    bias = bool(c.get("attention_bias", False))
    if bias != bool(c.get("mlp_bias", c["model_type"] == "llama" and bias)):
        _refuse(path, "attention_bias differs from mlp_bias (model.bias sets both)")
    if bias and c["model_type"] == "qwen3":
        _refuse(path, "attention biases with QK-norm")
    return {"vocab_size": c["vocab_size"], "block_size": c.get("max_position_embeddings", 2048),
            "n_layer": c["num_hidden_layers"], "n_head": heads, "n_embd": width, "norm": "rmsnorm",
            "norm_eps": c.get("rms_norm_eps", 1e-6), "mlp": "swiglu", "mlp_hidden": c["intermediate_size"],
            "bias": bias, "pos_emb": "rope", "rope_theta": float(rope.get("rope_theta", c.get("rope_theta", 1e4))),
            "qk_norm": c["model_type"] == "qwen3", "tie_embeddings": c.get("tie_word_embeddings", False)}  # fmt: skip


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers directory's safetensors (one file or an index of shards). Pickled
    weights (pytorch_model.bin) are refused: loading them can run code."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / "model.safetensors.index.json").is_file():
        shards = _read_json(path / "model.safetensors.index.json").get("weight_map", {}).values()
        files = [path / name for name in sorted(set(shards))]
    else:
        pickled = [name for name in PICKLED if (path / name).exists()]
        why = f"only {pickled[0]}, whose loading can run code" if pickled else "no model.safetensors"
        raise ValueError(f"{path} has {why}: save it with save_pretrained(safe_serialization=True) where you trust it")
    tensors = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except Exception as e:  # safetensors raises its own error types for a torn or garbled file
            raise ValueError(f"{file} cannot be read as safetensors ({type(e).__name__})") from None
    return tensors


def load_hf_weights(model: MiniGPT, path: str | Path) -> None:
    """Copy a transformers directory's weights into `model` (built from `read_architecture(path)`)."""
    style, _ = read_architecture(path)
    tensors = read_safetensors(path)
    if style == "gpt2":  # GPT2Model files (the hub's gpt2) have no "transformer." prefix
        tensors = {n if n.startswith(("transformer.", "lm_head.")) else f"transformer.{n}": t
                   for n, t in tensors.items()}  # fmt: skip
    model.load_state_dict(from_hf_state(tensors, model, style, str(path)))
