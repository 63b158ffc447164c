"""Download (or import a local copy of) project 6's preference data into data/: Anthropic HH-RLHF.

    --dataset hh_helpful   data/hh_rlhf/helpful-base/test.jsonl.gz    2,354 pairs (Bai et al. 2022), MIT
    --dataset hh_harmless  data/hh_rlhf/harmless-base/test.jsonl.gz   2,312 pairs (Bai et al. 2022), MIT
    --dataset all          both

The other two preference sources are project 4's downloads (the same files serve both projects):
    uv run python phase2_finetuning/project4_sft/download_data.py --dataset rasbt     # 1,100 preference records
    uv run python phase2_finetuning/project4_sft/download_data.py --dataset oasst1    # ranked sibling replies

Only the test splits of HH-RLHF are fetched (they are what the course's offline copy holds); preferences.py
splits them by a seed into our own train and held-out pairs. Each file is the Git LFS object of
anthropics/hh-rlhf at a pinned commit, checked by size and sha256 before it is kept (course/download.py).

With --source the file is imported instead: a local folder holding test.jsonl.gz (for --dataset all: the
folder holding helpful-base/ and harmless-base/, like ../shared/data/hh_rlhf), or a base URL laid out the same
way. Without network and without --source the run ends in one line saying so.

Examples:
    uv run python phase2_finetuning/project6_dpo/download_data.py --dataset all
    uv run python phase2_finetuning/project6_dpo/download_data.py --dataset all --source ../shared/data/hh_rlhf
    uv run python phase2_finetuning/project6_dpo/download_data.py --dataset hh_helpful \\
        --source ../shared/data/hh_rlhf/helpful-base
"""

from __future__ import annotations

from pathlib import Path

from course.cli import ArgumentParser
from course.cli import out_dir as out_dir_type
from course.errors import CourseError, run_cli

# Git LFS files are served from media.githubusercontent.com (raw.githubusercontent.com gives the pointer file)
HH_BASE = "https://media.githubusercontent.com/media/anthropics/hh-rlhf/354e5c3cb8960630860dd5774a6ac2a58313bf4d/"
# dataset -> (folder under data/, {file: (path under HH_BASE, bytes, sha256)})
DATASETS: dict[str, tuple[str, dict[str, tuple[str, int, str]]]] = {
    "hh_helpful": ("hh_rlhf/helpful-base", {
        "test.jsonl.gz": ("helpful-base/test.jsonl.gz", 875_191,
                          "8be3fc1a13b27901631696f2be6f184c799f1baeaf145f53ac5db24960adc37b")}),
    "hh_harmless": ("hh_rlhf/harmless-base", {
        "test.jsonl.gz": ("harmless-base/test.jsonl.gz", 742_801,
                          "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03")}),
}


def is_url(text: str) -> bool:
    return "://" in str(text)  # as course.download.is_url (imported late: it pulls in torch)


def fetch_dataset(name: str, data_dir: Path, source: str | None = None, force: bool = False) -> Path:
    """Fetch (or import from `source`) every file of one dataset; return its folder under data_dir."""
    from course.download import fetch_file

    if name not in DATASETS:
        raise CourseError(f"unknown dataset '{name}'; choose from: {', '.join(DATASETS)}")
    folder, files = DATASETS[name]
    dest = data_dir / folder
    if source is not None and not is_url(source) and not Path(source).expanduser().is_dir():
        raise CourseError(f"--source must be a folder holding {', '.join(files)} (e.g. ../shared/data/{folder}) "
                          f"or a base URL; not a folder: {source}")
    for rel, (remote, size, sha) in files.items():
        if source is None:
            url, src = HH_BASE + remote, None
        elif is_url(source):
            url, src = source.rstrip("/") + "/" + rel, None
        else:
            url, src = HH_BASE + remote, str(Path(source).expanduser() / rel)
        fetch_file(dest / rel, url, source=src, sha256=sha, size=size, force=force)
    print(f"{name}: {len(files)} file(s) in {dest} (sizes and sha256 ok)")
    return dest


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--dataset", choices=[*DATASETS, "all"], default="all", help="what to fetch (default: all)")
    p.add_argument("--source", default=None,
                   help="a local folder (or base URL) holding the dataset's files; for --dataset all, the folder "
                        "holding helpful-base/ and harmless-base/ (default: GitHub)")
    p.add_argument("--data_dir", type=out_dir_type, default=Path("data"), help="where data/ is (default: data)")
    p.add_argument("--force", action="store_true", help="fetch again even if a verified copy is present")
    p.add_argument("--seed", type=int, default=0, help="unused (downloads are deterministic)")
    p.add_argument("--device", default="cpu", help="unused")
    args = p.parse_args(argv)
    from course.paths import repo_path

    data_dir = repo_path(args.data_dir)
    names = list(DATASETS) if args.dataset == "all" else [args.dataset]
    for name in names:
        source = args.source
        if source is not None and args.dataset == "all":
            # the parent of the dataset folders, laid out like data/hh_rlhf (helpful-base/, harmless-base/)
            sub = Path(DATASETS[name][0]).name
            source = source.rstrip("/") + "/" + sub if is_url(source) else str(Path(source).expanduser() / sub)
        fetch_dataset(name, data_dir, source, args.force)
    print(f"done: {', '.join(names)} in {data_dir}/")


if __name__ == "__main__":
    run_cli(main)
