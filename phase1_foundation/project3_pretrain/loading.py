"""Find, load and check a model and its tokenizer, from whatever the user points a script at.

    checkpoints/project3/.../ckpt.pt        one of ours (train.py's checkpoint: a LLaMA, or the GPT baseline)
    path/to/folder/                         a Hugging Face LLaMA-architecture folder (config.json + safetensors)
    TinyLlama/TinyLlama-1.1B-Chat-v1.0      a Hugging Face hub id: downloaded with huggingface_hub, then as above
    data/stories260k/stories260K.bin        a llama2.c model file
    data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   a llama.cpp GGUF file (gguf_io; tokenizer and chat template inside)

Two levels. `load_model_from_checkpoint` / `load_any` / `load_matching_tokenizer` are what this project's
scripts need (our checkpoints, or an HF folder, with the course tokenizer). `load_model(spec)` /
`load_tokenizer_for(loaded)` take any of the four specs above and are what later projects' scripts build on
(project 8's generate.py and benchmark, fine-tuning, serving). Every foreign format goes through the one door,
`hf_interop.model_from_tensors`. Every failure is one CourseError line that says what to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from course.checkpoint import load_checkpoint
from course.errors import ConfigError, CourseError
from course.paths import REPO_ROOT, repo_path
from phase1_foundation.project1_minimal_gpt.config import GPTConfig
from phase1_foundation.project1_minimal_gpt.model import GPT
from phase1_foundation.project2_tokenizer.foreign_formats import (load_gguf_tokenizer, load_hf_tokenizer,
                                                                  load_llama2c_tokenizer)
from phase1_foundation.project2_tokenizer.formats import CourseTokenizer, load_tokenizer
from phase1_foundation.project3_pretrain.config import LlamaConfig
from phase1_foundation.project3_pretrain.data import TRAIN_CMD
from phase1_foundation.project3_pretrain.gguf_io import GGUFFile, read_gguf
from phase1_foundation.project3_pretrain.hf_interop import import_hf, model_from_tensors
from phase1_foundation.project3_pretrain.llama2c import load_llama2c, read_llama2c_header
from phase1_foundation.project3_pretrain.model import Llama

DEFAULT_CKPT = REPO_ROOT / "checkpoints" / "project3" / "cpu" / "ckpt.pt"
DEFAULT_TOKENIZER = REPO_ROOT / "checkpoints" / "project2" / "tokenizer.pkl"
PREPARED_TOKENIZER = REPO_ROOT / "data" / "project3" / "tokenizer.pkl"  # the copy prepare_data.py keeps
ARCHS = ("llama", "gpt")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]


# ---- the two architectures train.py builds ------------------------------------------------------------
def gpt_config_for(cfg: LlamaConfig) -> GPTConfig:
    """Project 1's GPT with the same depth, width, heads, context and vocabulary (no biases).

    With the `cpu` preset (intermediate_size=608) the two models have exactly the same parameter count:
    GQA's smaller K/V projections and the absent position table are paid back by a wider SwiGLU.
    """
    return GPTConfig(vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     n_embd=cfg.n_embd, dropout=cfg.dropout, bias=False).validate_config()


def build_model(arch: str, cfg: LlamaConfig) -> torch.nn.Module:
    if arch == "gpt":
        return GPT(gpt_config_for(cfg))
    return Llama(cfg)


# ---- this project's checkpoints -----------------------------------------------------------------------
def load_model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, checkpoint dict) of a train.py checkpoint.

    Checked before anything is loaded: that it is a project-3 checkpoint (a project 1 one says so), a known
    architecture, a valid stored config, and weights whose names and shapes that config implies.
    """
    path = repo_path(path)
    state = load_checkpoint(path, map_location="cpu", hint=f"train one first with: {TRAIN_CMD}")
    if not isinstance(state, dict):
        raise CourseError(f"{path} holds a {type(state).__name__}, not a checkpoint dict; train one with: {TRAIN_CMD}")
    if "model_config" not in state and ("chars" in state or "config" in state):
        raise CourseError(f"{path} is a project 1 checkpoint (the character-level GPT); project 3 loads the "
                          f"checkpoints of its own train.py: {TRAIN_CMD}")
    missing = [k for k in ("model_state_dict", "model_config") if k not in state]
    if missing:
        raise CourseError(f"{path} is not a project-3 checkpoint (missing {', '.join(missing)})")
    arch = state.get("arch", "llama")
    if arch not in ARCHS:
        raise CourseError(f"{path}: unknown architecture '{arch}' (expected one of {', '.join(ARCHS)})")
    try:
        mcfg = LlamaConfig.from_dict(state["model_config"]).validate_config()
    except ConfigError as e:
        raise CourseError(f"{path}: the stored model config is invalid ({e}); the checkpoint is corrupt or "
                          "from another project") from None
    with torch.device("meta"):  # the expected names and shapes, without allocating the weights twice
        expected = build_model(arch, mcfg).state_dict()
    # a checkpoint of a torch.compile'd model prefixes every name with _orig_mod.
    weights = {k.removeprefix("_orig_mod."): v for k, v in state["model_state_dict"].items()}
    for name, t in weights.items():
        if name in expected and tuple(t.shape) != tuple(expected[name].shape):
            raise CourseError(f"{path}: tensor '{name}' has shape {tuple(t.shape)} but the stored config implies "
                              f"{tuple(expected[name].shape)}; the checkpoint is corrupt or from another model")
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        what = "; ".join(f"{label} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                         for label, names in (("missing", missing), ("unexpected", unexpected)) if names)
        raise CourseError(f"{path}: the weights do not match a {arch} model of the stored "
                          f"config ({what}); the checkpoint is corrupt or from another model")
    model = build_model(arch, mcfg)
    model.load_state_dict(weights)
    return model.to(device).eval(), state


def load_any(ckpt: str | None, hf_dir: str | None, device: torch.device) -> tuple[torch.nn.Module, Path | None]:
    """(model, tokenizer path stored with it or None) from a train.py checkpoint or an HF folder."""
    if hf_dir:
        tok = Path(hf_dir) / "tokenizer.pkl"
        return import_hf(hf_dir).to(device), (tok if tok.is_file() else None)
    model, state = load_model_from_checkpoint(ckpt or DEFAULT_CKPT, device)
    tok = state.get("data_meta", {}).get("tokenizer")
    # the copy prepare_data.py keeps next to the shards (stored relative to the repo root)
    for cand in ([repo_path(tok)] if tok else []) + [PREPARED_TOKENIZER]:
        if cand.is_file():
            return model, cand
    return model, None


def tokenizer_path(given: str | Path | None, stored: Path | None = None) -> Path:
    """Which tokenizer a script uses: --tokenizer if given, else the one load_any found with the model, else the
    default (the cpu run's)."""
    return Path(given) if given else (stored or DEFAULT_TOKENIZER)


def load_matching_tokenizer(path: str | Path | None, model: torch.nn.Module, stored: Path | None = None):
    """Project 2's tokenizer at `tokenizer_path(path, stored)`, checked to have exactly as many ids as the
    model's vocabulary."""
    path = tokenizer_path(path, stored)
    if not path.is_file():
        raise CourseError(f"tokenizer not found: {path}; pass --tokenizer PATH (project 2's tokenizer.pkl)")
    tok = load_tokenizer(path)
    n = max(tok.vocab_size, (tok.eot_token or 0) + 1)
    if n != model.config.vocab_size:
        raise CourseError(f"{path} has {n} token ids but the model's vocabulary is {model.config.vocab_size}; "
                          "use the tokenizer the model was trained with")
    return tok


# ---- any model: ours, an HF folder or hub id, a llama2.c file ------------------------------------------
@dataclass
class Loaded:
    model: Llama
    kind: str            # "ours" | "hf" | "llama2c" | "gguf"
    folder: Path | None  # HF folder (for tokenizer.json / tokenizer_config.json)
    path: Path
    tokenizer: Path | None = None  # ours: the tokenizer copy its training data was made with
    metadata: dict | None = None   # gguf: the file's key/values (its tokenizer and chat template)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def hub_download(repo_id: str) -> Path:
    """Download config, safetensors and tokenizer files of a hub repo into the HF cache; return the folder."""
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated repo, ...: all end the same way for the user
        raise CourseError(f"could not download '{repo_id}' from the Hugging Face hub ({type(e).__name__}: "
                          f"{_first_line(e)[:160]}); check the id and your connection, or pass a local folder "
                          "to --model") from None


def _load_ours(path: Path) -> tuple[Llama, Path | None]:
    """Our checkpoint (shape checks that name the tensor), plus the tokenizer its data was made with."""
    model, tokenizer = load_any(str(path), None, torch.device("cpu"))
    if not isinstance(model, Llama):
        raise CourseError(f"{path} holds project 1's GPT (train.py --arch gpt), not a Llama; the KV-cache engine "
                          "runs the LLaMA architecture: pass checkpoints/project3/cpu/ckpt.pt or an HF folder")
    return model, tokenizer


MODEL_SUFFIXES = (".pt", ".bin", ".gguf", ".safetensors", ".pkl", ".json")
_MAKE_HINT = {
    ".pt": f"train a checkpoint with: {TRAIN_CMD}",
    ".bin": "pass an existing llama2.c .bin (project 8's download_data.py fetches stories260K and stories15M)",
    ".gguf": "pass the path of an existing .gguf file",
    "": "pass an existing checkpoint .pt, llama2.c .bin, .gguf file or Hugging Face folder, or a hub id like "
        "owner/name",
}


def _looks_like_path(spec: str) -> bool:
    """A spec that names a local file: a model suffix, a leading ./ ../ / ~, or more than one slash."""
    return (Path(spec).suffix.lower() in MODEL_SUFFIXES or spec.startswith((".", "/", "~"))
            or spec.count("/") > 1 or "\\" in spec)


def load_model(spec: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Loaded:
    """A checkpoint .pt, an HF folder, a llama2.c .bin or a hub id -> Loaded (model in eval mode on device)."""
    path = repo_path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CourseError(f"{path} is a folder without config.json; --model takes a Hugging Face LLaMA folder, "
                              "a checkpoint .pt, a llama2.c .bin or a hub id")
        loaded = Loaded(import_hf(path), "hf", path, path)
    elif path.is_file():
        if path.suffix == ".pt":
            model, tok_path = _load_ours(path)
            loaded = Loaded(model, "ours", None, path, tok_path)
        elif path.suffix == ".bin":
            read_llama2c_header(path)  # a clear error if it is not one
            loaded = Loaded(load_llama2c(path), "llama2c", None, path)
        elif path.suffix == ".gguf":
            cfg, tensors, meta = read_gguf(GGUFFile(path))
            loaded = Loaded(model_from_tensors(cfg, tensors, str(path)), "gguf", None, path, metadata=meta)
        else:
            raise CourseError(f"unknown model format: {path} (expected a checkpoint .pt, a llama2.c .bin, "
                              "a .gguf file, a Hugging Face folder or a hub id)")
    elif _looks_like_path(spec):
        # a missing local file must not turn into a hub download attempt (`missing/model.pt` matches owner/name)
        raise CourseError(f"model not found: {path}; {_MAKE_HINT.get(Path(spec).suffix, _MAKE_HINT[''])}")
    elif HUB_ID.match(spec):
        folder = hub_download(spec)
        loaded = Loaded(import_hf(folder), "hf", folder, folder)
    else:
        raise CourseError(f"model not found: {spec} (expected a checkpoint .pt, a llama2.c .bin, a Hugging Face "
                          "folder or a hub id like owner/name)")
    loaded.model.to(device=device, dtype=dtype)
    return loaded


def load_tokenizer_for(loaded: Loaded, spec: str | None = None):
    """The tokenizer: --tokenizer if given, else the one that ships with the model."""
    if spec:
        path = Path(spec).expanduser()
        if path.is_dir():
            return load_hf_tokenizer(path)
        if path.name == "tokenizer.json":
            return load_hf_tokenizer(path.parent)
        if path.suffix == ".bin":
            return load_llama2c_tokenizer(path, loaded.model.config.vocab_size)
        if path.suffix == ".pkl":
            return course_tokenizer(path)
        if path.suffix == ".gguf":
            return load_gguf_tokenizer(GGUFFile(path).metadata)
        if not path.exists():
            raise CourseError(f"tokenizer not found: {path}")
        raise CourseError(f"unknown tokenizer format: {path} (expected tokenizer.json, a llama2.c .bin or a .pkl)")
    if loaded.kind == "hf":
        if (loaded.folder / "tokenizer.json").is_file():
            return load_hf_tokenizer(loaded.folder)
        if (loaded.folder / "tokenizer.pkl").is_file():  # written by export_hf
            return course_tokenizer(loaded.folder / "tokenizer.pkl")
        raise CourseError(f"no tokenizer.json or tokenizer.pkl in {loaded.folder}; pass one with --tokenizer")
    if loaded.kind == "gguf":
        meta = loaded.metadata if loaded.metadata is not None else GGUFFile(loaded.path).metadata
        return load_gguf_tokenizer(meta)
    if loaded.kind == "llama2c":
        candidates = sorted(loaded.path.parent.glob("tok*.bin"))
        if len(candidates) == 1:
            return load_llama2c_tokenizer(candidates[0], loaded.model.config.vocab_size)
        raise CourseError(f"pass the llama2.c tokenizer of {loaded.path.name} with --tokenizer (e.g. tok512.bin)")
    if loaded.tokenizer is not None:
        return course_tokenizer(loaded.tokenizer)
    if DEFAULT_TOKENIZER.is_file():
        return course_tokenizer(DEFAULT_TOKENIZER)
    raise CourseError(f"no tokenizer given and {DEFAULT_TOKENIZER} does not exist; train it with project 2 "
                      "or pass one with --tokenizer")


def course_tokenizer(path: Path):
    """Project 2's tokenizer (.pkl), with <|endoftext|> as the end-of-text token (and BOS for our models)."""
    if not path.is_file():
        raise CourseError(f"tokenizer not found: {path}")
    tok = load_tokenizer(str(path))
    eot = getattr(tok, "eot_token", None)
    return CourseTokenizer(tok, bos_id=eot, eos_id=eot, add_bos=False, name=f"course {path.name}")
