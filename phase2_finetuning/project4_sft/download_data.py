"""Download (or import a local copy of) project 4's datasets into data/: instruction data and evaluations.

    --dataset alpaca     data/alpaca_subset/alpaca_5000.json   5,000 Stanford Alpaca records (CC BY-NC 4.0)
    --dataset rasbt      data/rasbt_instruction/*.json         1,100 instruction records (+ preference pairs)
    --dataset oasst1     data/oasst1/en-validation.jsonl       OpenAssistant oasst1, English validation messages
    --dataset gsm8k      data/gsm8k/{train,test}.jsonl         grade-school math (Cobbe et al. 2021)
    --dataset arc        data/arc/ARC-{Easy,Challenge}/*.jsonl AI2 Reasoning Challenge (Clark et al. 2018)
    --dataset mmlu       data/mmlu/{dev,val,test}/*.csv        57 subjects (Hendrycks et al. 2021), 171 files
    --dataset humaneval  data/humaneval/HumanEval.jsonl.gz     164 Python problems (Chen et al. 2021)
    --dataset all        every one of the above

Every file is the blob of a public GitHub repository at a pinned commit, checked by size and sha256 before it is
kept (course/download.py). With --source DIR the files are imported from a local folder laid out like the
dataset's folder under data/ (e.g. ../shared/data/arc); with --source URL from that base URL instead.

Examples:
    uv run python phase2_finetuning/project4_sft/download_data.py --dataset all
    uv run python phase2_finetuning/project4_sft/download_data.py --dataset mmlu --source ../shared/data/mmlu
"""

from __future__ import annotations

import argparse
import csv
import urllib.parse
from pathlib import Path

from tqdm import tqdm

from course.download import fetch_file, is_url
from course.errors import CourseError, run_cli
from course.paths import repo_path

HERE = Path(__file__).resolve().parent
RAW = "https://raw.githubusercontent.com/"
MMLU_MANIFEST = HERE / "mmlu_manifest.tsv"


def _gh(repo: str, commit: str) -> str:
    return f"{RAW}{repo}/{commit}/"


ARC_BASE = _gh("RazvanDu/TemporalRNNs", "7216ec675f3ff6af23b62e5e674dbc1ed6c61530")

# dataset -> (folder under data/, base URL, {file under the folder: (path under the base URL, bytes, sha256)})
DATASETS: dict[str, tuple[str, str, dict[str, tuple[str, int, str]]]] = {
    "alpaca": ("alpaca_subset", _gh("tatsu-lab/stanford_alpaca", "5e69c50054c48cd3b919c46d13bb2d92a62f4498"), {
        "alpaca_5000.json": ("data/alpaca_5000.json", 2_044_701,
                             "fc1add24c93c9fbbe585a64a6c9bf6165eb110225f4470efbff382a913558ec0")}),
    "rasbt": ("rasbt_instruction", _gh("rasbt/LLMs-from-scratch", "28c65cdfbc3338e2e040016eea4b7fdf556e4d57"), {
        "instruction-data.json": ("ch07/01_main-chapter-code/instruction-data.json", 203_524,
                                  "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"),
        "instruction-data-with-preference.json": (
            "ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json", 386_968,
            "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e")}),
    "oasst1": ("oasst1", _gh("TurkuNLP/oasst-fi", "45e9c4600eacf5844887e321ba3952befe9727dc"), {
        "en-validation.jsonl": ("original-data/en-validation.jsonl", 3_373_178,
                                "b92db3f1db324f5aa3c5d75ed65a451b54063de1de7370506233c9917043bd66")}),
    "gsm8k": ("gsm8k", _gh("openai/grade-school-math", "3101c7d5072418e28b9008a6636bde82a006892c"), {
        "train.jsonl": ("grade_school_math/data/train.jsonl", 4_166_206,
                        "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"),
        "test.jsonl": ("grade_school_math/data/test.jsonl", 749_738,
                       "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14")}),
    "arc": ("arc", ARC_BASE, {
        f"ARC-{kind}/ARC-{kind}-{split}.jsonl": (f"ARC-{kind}/ARC-{kind}-{split}.jsonl", size, sha)
        for kind, split, size, sha in [
            ("Challenge", "Dev", 126_540, "55224364abd2477f66a9a57c5cbef109fb71d83019aa5e37aec0e7ab757746ca"),
            ("Challenge", "Test", 492_726, "9fa8ffb3e3a1f88cb302d53dd95aae81e39209ad9bcf974376b319d8fd35717c"),
            ("Challenge", "Train", 461_680, "e02837c53ee86f6d73c259f91c77725c5062ef4531130b7f473a9d9b01118a77"),
            ("Easy", "Dev", 214_423, "f4364b808a68df6bf500ce1070fb0105d40cacd2391c210deb00ff83ba75d1f4"),
            ("Easy", "Test", 895_104, "ce32a0774b4beb1977d2c6b16dda5dd2b24fdc9c7f506882c452678676bd09be"),
            ("Easy", "Train", 844_113, "c62e5482d8c01f2d5a7f24239ac9db3b12f9e47267c4e3f088c6ffe41d5545ef")]}),
    "humaneval": ("humaneval", _gh("openai/human-eval", "6d43fb980f9fee3c892a914eda09951f772ad10d"), {
        "HumanEval.jsonl.gz": ("data/HumanEval.jsonl.gz", 44_877,
                               "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef")}),
}


def mmlu_files() -> dict[str, tuple[str, int, str]]:
    """The 171 MMLU CSVs (57 subjects x dev/val/test), each pinned by size and sha256 in mmlu_manifest.tsv."""
    with open(MMLU_MANIFEST, newline="", encoding="utf-8") as f:
        return {r["path"]: ("MMLU/" + r["path"], int(r["bytes"]), r["sha256"]) for r in csv.DictReader(f, delimiter="\t")}


DATASETS["mmlu"] = ("mmlu", ARC_BASE, mmlu_files())


def fetch_dataset(name: str, data_dir: Path, source: str | None = None, force: bool = False) -> Path:
    """Fetch (or import from `source`) every file of one dataset; return its folder under data_dir."""
    if name not in DATASETS:
        raise CourseError(f"unknown dataset '{name}'; choose from: {', '.join(DATASETS)}")
    folder, base, files = DATASETS[name]
    dest = data_dir / folder
    local = None
    if source is not None and not is_url(source):
        local = Path(source).expanduser()
        if not local.is_dir():
            raise CourseError(f"--source must be the dataset's folder (e.g. ../shared/data/{folder}) or a base URL; "
                              f"not a folder: {local}")
    for rel, (remote, size, sha) in tqdm(files.items(), desc=name, unit="file", leave=False, disable=len(files) < 8):
        if local is not None:
            url, src = base + remote, str(local / rel)
        elif source is not None:  # a base URL laid out like the data folder
            url, src = source.rstrip("/") + "/" + urllib.parse.quote(rel), None
        else:
            url, src = base + urllib.parse.quote(remote), None
        fetch_file(dest / rel, url, source=src, sha256=sha, size=size, force=force)
    print(f"{name}: {len(files)} file(s) in {dest} (sizes and sha256 ok)")
    return dest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=[*DATASETS, "all"])
    p.add_argument("--source", default=None,
                   help="a local folder laid out like the dataset's folder under data/, or a base URL (default: GitHub)")
    p.add_argument("--data_dir", default="data", help="where data/ is (default: data)")
    p.add_argument("--force", action="store_true", help="fetch again even if a verified copy is present")
    args = p.parse_args(argv)
    if args.dataset == "all" and args.source is not None and not is_url(args.source):
        # --source for "all" is the parent folder holding every dataset folder (like ../shared/data)
        root = Path(args.source).expanduser()
        for name, (folder, _, _) in DATASETS.items():
            fetch_dataset(name, repo_path(args.data_dir), str(root / folder), args.force)
        return
    names = list(DATASETS) if args.dataset == "all" else [args.dataset]
    for name in names:
        fetch_dataset(name, repo_path(args.data_dir), args.source, args.force)


if __name__ == "__main__":
    run_cli(main)
