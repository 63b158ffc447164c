"""Speak the ecosystem's format: export our Llama to a Hugging Face folder and import any HF LLaMA checkpoint.

THE ONE DOOR: every model format enters through `model_from_tensors(config, tensors)`: a LlamaConfig and a dict
of tensors named as Hugging Face's LlamaForCausalLM names them. A format is then only a reader that produces
those two things: `read_hf(folder)` here, `llama2c.read_llama2c(path)`, `gguf_io.read_gguf(path)`. The door
checks what every reader would otherwise check again: each expected tensor is present with the shape the config
implies, nothing unexpected is left over, and a tied classifier shares the embedding.

Format: a folder with `config.json` (LlamaConfig fields: hidden_size, num_attention_heads, ...) and
`model.safetensors` (or sharded `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`), tensor
names as `LlamaForCausalLM.state_dict()` has them:
    model.embed_tokens.weight                          <- tok_emb.weight
    model.layers.{i}.input_layernorm.weight            <- layers.{i}.attn_norm.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight   <- layers.{i}.attn.w{q,k,v,o}.weight
    model.layers.{i}.post_attention_layernorm.weight   <- layers.{i}.mlp_norm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight    <- layers.{i}.mlp.w{1,3,2}.weight
    model.norm.weight                                  <- norm.weight
    lm_head.weight                                     <- lm_head.weight (absent when tie_word_embeddings)

RoPE permutation convention: Meta's original LLaMA code rotates neighbouring pairs (x0,x1),(x2,x3),...
(complex multiplication); HF's LlamaAttention rotates split halves (x_i, x_{i+d/2}). HF's conversion script
therefore permutes the rows of every q_proj/k_proj head when converting Meta weights. Our model uses the HF
split-half layout (model.rope_tables), so export/import copy q/k as they are; `permute_rope` /
`unpermute_rope` convert Meta-layout (or llama2.c) q/k weights to ours and back, with a test proving it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from course.checkpoint import atomic_write, atomic_write_json
from course.errors import CourseError
from phase1_foundation.project3_pretrain.model import Llama, LlamaConfig

SUPPORTED_ARCHS = ("LlamaForCausalLM",)


# ---- the RoPE layout permutation ----------------------------------------------------------------
def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta interleaved-pair layout -> HF/ours split-half layout for a q or k projection (out, in).

    Within each head, output rows (0,1),(2,3),... become rows (0,d/2),(1,d/2+1),...: HF's
    convert_llama_weights_to_hf.permute, view(n, d/2, 2, in).transpose(1, 2).
    """
    out, inp = w.shape
    d = out // n_heads
    return w.view(n_heads, d // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of permute_rope: HF/ours split-half layout -> Meta interleaved-pair layout."""
    out, inp = w.shape
    d = out // n_heads
    return w.view(n_heads, 2, d // 2, inp).transpose(1, 2).reshape(out, inp)


# ---- config -------------------------------------------------------------------------------------
def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    rope_type = params.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if rope_type not in (None, "default"):
        raise CourseError(f"rope scaling type '{rope_type}' is not supported (only plain RoPE)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))


def llama_config_from_hf(hf: dict, source: str = "config.json") -> LlamaConfig:
    """Translate an HF LlamaConfig dict into ours; anything we cannot represent is one clear error."""
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    if hf.get("model_type", "llama") != "llama" or not any(a in SUPPORTED_ARCHS for a in archs):
        raise CourseError(f"{source}: model_type '{hf.get('model_type')}' / architectures {archs} is not a "
                          "LLaMA-architecture checkpoint (expected model_type 'llama', LlamaForCausalLM)")
    unsupported = []
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act '{hf['hidden_act']}' (only silu)")
    if hf.get("attention_bias", False):
        unsupported.append("attention_bias true (our model has no biases)")
    if hf.get("mlp_bias", False):
        unsupported.append("mlp_bias true (our model has no biases)")
    if hf.get("pretraining_tp", 1) not in (1, None):
        unsupported.append(f"pretraining_tp {hf['pretraining_tp']}")
    try:
        theta = _rope_theta(hf)
    except CourseError as e:
        unsupported.append(str(e))
        theta = 10_000.0
    if unsupported:
        raise CourseError(f"{source}: unsupported config: " + "; ".join(unsupported))
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise CourseError(f"{source}: missing required field(s): {', '.join(missing)}")
    n_head = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_head
    cfg = LlamaConfig(
        block_size=hf.get("max_position_embeddings", 2048),
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=hf["hidden_size"],
        head_dim=None if head_dim * n_head == hf["hidden_size"] else head_dim,
        intermediate_size=hf["intermediate_size"],
        rope_theta=theta,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dropout=0.0,
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    try:
        return cfg.validate_config()
    except CourseError as e:
        raise CourseError(f"{source}: {e}") from None


def hf_config_from_llama(cfg: LlamaConfig, dtype: str = "float32") -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.hd,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        # transformers >= 5 reads rope_parameters, 4.x reads rope_theta: write both.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
    }


# ---- weights ------------------------------------------------------------------------------------
def hf_name_map(cfg: LlamaConfig) -> dict[str, str]:
    """Our state-dict names -> Hugging Face LlamaForCausalLM names (no lm_head entry when tied)."""
    names = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    per_layer = {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
                 "attn.wq.weight": "self_attn.q_proj.weight", "attn.wk.weight": "self_attn.k_proj.weight",
                 "attn.wv.weight": "self_attn.v_proj.weight", "attn.wo.weight": "self_attn.o_proj.weight",
                 "mlp.w1.weight": "mlp.gate_proj.weight", "mlp.w3.weight": "mlp.up_proj.weight",
                 "mlp.w2.weight": "mlp.down_proj.weight"}
    for i in range(cfg.n_layer):
        for ours, theirs in per_layer.items():
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


def hf_model_sharing(model: Llama):
    """A transformers LlamaForCausalLM whose parameters ARE our tensors (no copy): same weights, same memory.
    The peer of benchmarks that time ours beside transformers on identical weights."""
    import transformers

    cfg = transformers.LlamaConfig(**hf_config_from_llama(model.config))
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(cfg)
    ours = model.state_dict()
    state = {theirs: ours[mine] for mine, theirs in hf_name_map(model.config).items()}
    if model.config.tie_embeddings:
        state["lm_head.weight"] = ours["tok_emb.weight"]
    hf.load_state_dict(state, strict=True, assign=True)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg)  # non-persistent buffer: build it for real
    return hf.eval()


def export_hf(model: Llama, out_dir: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None) -> Path:
    """Write config.json + model.safetensors (LlamaForCausalLM layout) into out_dir; return out_dir.

    With tokenizer_path, the project-2 tokenizer .pkl is copied next to them so the folder is self-contained
    for our own generate.py (transformers does not read that format).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = model.state_dict()
    tensors = {theirs: state[ours].detach().to("cpu").contiguous().clone() for ours, theirs in hf_name_map(cfg).items()}
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    atomic_write(out / "model.safetensors", lambda f: f.write(_safetensors_bytes(tensors)))
    atomic_write_json(out / "config.json", hf_config_from_llama(cfg, dtype))
    atomic_write_json(out / "generation_config.json", {"do_sample": False})
    if tokenizer_path is not None:
        src = Path(tokenizer_path)
        if not src.is_file():
            raise CourseError(f"tokenizer not found: {src}")
        atomic_write(out / "tokenizer.pkl", lambda f: f.write(src.read_bytes()))
    return out


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save(tensors, metadata={"format": "pt"})


def _load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    try:
        if single.is_file():
            return load_file(single)
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            tensors: dict[str, torch.Tensor] = {}
            for shard in shards:
                tensors.update(load_file(folder / shard))
            return tensors
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError, ValueError) as e:
        raise CourseError(f"could not read the weights in {folder} ({type(e).__name__}: {e}); "
                          "the file is corrupt or truncated") from None
    raise CourseError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                      "(only safetensors checkpoints are supported)")


def model_from_tensors(config: LlamaConfig, tensors: dict[str, torch.Tensor], source: str = "tensors") -> Llama:
    """(config, HF-named tensors) -> our Llama in eval mode, float32: the one in-memory door of every format.

    INTUITION: a checkpoint format is a container; what is inside is always a config and named matrices. Checking
    them once, here, gives every reader (HF folder, llama2.c, GGUF) the same errors for the same faults.
    IMPLEMENTATION: every name of `hf_name_map(config)` must be present with the shape the config implies; any
    other tensor is an error naming it, except RoPE's `rotary_emb.inv_freq` (recomputed) and, for a tied model,
    an `lm_head.weight` copy (the embedding is used). Each fault is one CourseError that starts with `source`.
    """
    try:
        config.validate_config()
    except CourseError as e:
        raise CourseError(f"{source}: {e}") from None
    model = Llama(config)
    expected = model.state_dict()
    names = hf_name_map(config)
    missing = [theirs for theirs in names.values() if theirs not in tensors]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CourseError(f"{source}: tensor(s) {', '.join(repr(m) for m in missing[:3])}{more} missing from the "
                          "weights; the file is incomplete or not a LLaMA checkpoint")
    known = set(names.values()) | {"lm_head.weight"}  # a tied checkpoint may still carry a copy of lm_head
    extra = sorted(k for k in tensors if k not in known and not k.endswith("rotary_emb.inv_freq"))
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise CourseError(f"{source}: unexpected tensor(s) {', '.join(extra[:5])}{more} for a LLaMA checkpoint")
    state = {}
    for ours, theirs in names.items():
        t = tensors[theirs]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise CourseError(f"{source}: '{theirs}' is {getattr(t, 'dtype', type(t).__name__)}, not a float tensor"
                              " (dequantize it first)")
        if tuple(t.shape) != tuple(expected[ours].shape):
            raise CourseError(f"{source}: '{theirs}' has shape {tuple(t.shape)} but the config implies "
                              f"{tuple(expected[ours].shape)}")
        state[ours] = t
    if config.tie_embeddings:  # one matrix, two names: load_state_dict wants both
        state["lm_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True)  # copies into our float32 parameters (any float dtype in)
    return model.eval()


def read_hf(folder: str | os.PathLike) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """A Hugging Face LLaMA folder -> (our config, its tensors by HF name), without building a model."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CourseError(f"{cfg_path} not found; point at a folder written by export_hf or save_pretrained")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CourseError(f"{cfg_path} is not valid JSON ({e})") from None
    return llama_config_from_hf(hf, str(cfg_path)), _load_tensors(folder)


def import_hf(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> Llama:
    """Load any HF LLaMA-architecture checkpoint folder into our Llama (fp32 unless dtype is given)."""
    cfg, tensors = read_hf(folder)
    model = model_from_tensors(cfg, tensors, source=str(folder))
    if dtype is not None:
        model.to(dtype)
    return model


__all__ = ["model_from_tensors", "hf_name_map", "read_hf", "import_hf", "export_hf", "llama_config_from_hf",
           "hf_config_from_llama", "permute_rope", "unpermute_rope"]
