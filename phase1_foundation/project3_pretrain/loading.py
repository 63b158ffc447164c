"""Find, load and check a model and its tokenizer from whatever the user points --model at.

    checkpoints/project3/.../ckpt.pt        one of ours (project 3's training checkpoint)
    path/to/folder/                         a Hugging Face LLaMA-architecture folder (config.json + safetensors),
                                            through project 3's importer (hf_interop.import_hf)
    TinyLlama/TinyLlama-1.1B-Chat-v1.0      a Hugging Face hub id: downloaded with huggingface_hub, then as above
    data/stories260k/stories260K.bin        a llama2.c model file

Every failure is one CourseError line that says what to do.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from course.errors import CourseError
from course.paths import REPO_ROOT, repo_path
from phase1_foundation.project2_tokenizer.formats import load_hf_tokenizer, load_llama2c_tokenizer
from phase1_foundation.project3_pretrain.hf_interop import import_hf
from phase1_foundation.project3_pretrain.model import Llama
from phase3_core_inference.project8_kv_cache.llama2c import load_llama2c, read_llama2c_header

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
DEFAULT_COURSE_TOKENIZER = REPO_ROOT / "checkpoints" / "project2" / "tokenizer.pkl"


@dataclass
class Loaded:
    model: Llama
    kind: str            # "ours" | "hf" | "llama2c"
    folder: Path | None  # HF folder (for tokenizer.json / tokenizer_config.json)
    path: Path
    tokenizer: Path | None = None  # ours: the tokenizer copy its training data was made with


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
    """Project 3's own loader (shape checks that name the tensor), plus the tokenizer its data was made with."""
    from phase1_foundation.project3_pretrain.generate import load_any

    model, tokenizer = load_any(str(path), None, torch.device("cpu"))
    if not isinstance(model, Llama):
        raise CourseError(f"{path} holds project 1's GPT (train.py --arch gpt), not a Llama; the KV-cache engine "
                          "runs the LLaMA architecture: pass checkpoints/project3/cpu/ckpt.pt or an HF folder")
    return model, tokenizer


def _load_llama2c_model(path: Path) -> Llama:
    """llama2.c .bin -> HF layout (RoPE rows permuted) -> project 3's importer, through a temporary folder."""
    config, state = load_llama2c(path)
    with tempfile.TemporaryDirectory(prefix="llama2c_") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        save_file(state, str(Path(tmp) / "model.safetensors"))
        return import_hf(tmp)


def load_model(spec: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Loaded:
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
            loaded = Loaded(_load_llama2c_model(path), "llama2c", None, path)
        else:
            raise CourseError(f"unknown model format: {path} (expected a checkpoint .pt, a llama2.c .bin, "
                              "a Hugging Face folder or a hub id)")
    elif HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
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
        if not path.exists():
            raise CourseError(f"tokenizer not found: {path}")
        raise CourseError(f"unknown tokenizer format: {path} (expected tokenizer.json, a llama2.c .bin or a .pkl)")
    if loaded.kind == "hf":
        if (loaded.folder / "tokenizer.json").is_file():
            return load_hf_tokenizer(loaded.folder)
        if (loaded.folder / "tokenizer.pkl").is_file():  # written by project 3's export_hf
            return course_tokenizer(loaded.folder / "tokenizer.pkl")
        raise CourseError(f"no tokenizer.json or tokenizer.pkl in {loaded.folder}; pass one with --tokenizer")
    if loaded.kind == "llama2c":
        candidates = sorted(loaded.path.parent.glob("tok*.bin"))
        if len(candidates) == 1:
            return load_llama2c_tokenizer(candidates[0], loaded.model.config.vocab_size)
        raise CourseError(f"pass the llama2.c tokenizer of {loaded.path.name} with --tokenizer (e.g. tok512.bin)")
    if loaded.tokenizer is not None:
        return course_tokenizer(loaded.tokenizer)
    if DEFAULT_COURSE_TOKENIZER.is_file():
        return course_tokenizer(DEFAULT_COURSE_TOKENIZER)
    raise CourseError(f"no tokenizer given and {DEFAULT_COURSE_TOKENIZER} does not exist; train it with project 2 "
                      "or pass one with --tokenizer")


def course_tokenizer(path: Path):
    """Project 2's tokenizer (.pkl), with <|endoftext|> as the end-of-text token (and BOS for our models)."""
    from phase1_foundation.project2_tokenizer.formats import CourseTokenizer, load_tokenizer

    if not path.is_file():
        raise CourseError(f"tokenizer not found: {path}")
    tok = load_tokenizer(str(path))
    eot = getattr(tok, "eot_token", None)
    return CourseTokenizer(tok, bos_id=eot, eos_id=eot, add_bos=False, name=f"course {path.name}")
