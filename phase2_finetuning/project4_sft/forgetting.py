"""What fine-tuning cost on a multiple-choice task: the change in accuracy between two evaluate.py reports of the
same questions, with the standard error of that change.

    uv run python phase2_finetuning/project4_sft/forgetting.py runs/project4/before-arc.json runs/project4/after-arc.json

WHY paired: both reports score the very same questions, so the change is the mean of the per-question
differences d_i = correct_after_i - correct_before_i, and its standard error is sd(d) / sqrt(n). Most questions
are answered the same way twice, so this is far smaller than the two accuracies' standard errors combined
(which treats the runs as independent samples): a drop of 1.5 points is only visible with the paired error.
"""

from __future__ import annotations

import json

from course.cli import ArgumentParser, existing_file
from course.errors import CourseError, run_cli
from phase2_finetuning.project4_sft.harness import tasks
from phase2_finetuning.project4_sft.harness.multiple_choice import paired_change


def answers(task: str, limit: int, shots: int, seed: int) -> list[int]:
    """The right choice of every question, in the order evaluate.py asked them."""
    if task in ("arc_easy", "arc_challenge"):
        kind = "Easy" if task == "arc_easy" else "Challenge"
        if shots:
            raise CourseError("few-shot ARC reports are not supported here (the items are the same; use --shots 0)")
        return [i.answer for i in tasks.subset(tasks.load_arc(kind, "Test"), limit, seed)]
    if task == "mmlu":
        items = tasks.subset(tasks.load_mmlu("test", shots), limit, seed, key=lambda i: i.subject)
        return [i.answer for i in items]
    raise CourseError(f"{task} is not a multiple-choice task")


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("before", type=existing_file, help="evaluate.py's JSON report before fine-tuning")
    p.add_argument("after", type=existing_file, help="the report after, of the same tasks and --limit")
    p.add_argument("--seed", type=int, default=1337, help="evaluate.py's --seed (it fixes the subset)")
    args = p.parse_args(argv)
    reports = []
    for path in (args.before, args.after):
        try:
            reports.append(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CourseError(f"{path} is not an evaluate.py JSON report ({e})") from None
    rb, ra = ({r["task"]: r for r in rep.get("results", [])} for rep in reports)
    meta = reports[0].get("meta", {})
    if meta.get("limit") != reports[1].get("meta", {}).get("limit"):
        raise CourseError("the two reports used different --limit values: they did not score the same questions")
    common = [t for t in rb if t in ra and "picks" in rb[t].get("extra", {}) and "picks" in ra[t].get("extra", {})]
    if not common:
        raise CourseError("no multiple-choice task with per-question picks is in both reports; rerun evaluate.py")
    for t in common:
        truth = answers(t, meta.get("limit", 0), meta.get("shots", 0), args.seed)
        pb, pa = rb[t]["extra"]["picks"], ra[t]["extra"]["picks"]
        if not len(pb) == len(pa) == len(truth):
            raise CourseError(f"{t}: {len(pb)} and {len(pa)} picks for {len(truth)} questions; not the same run")
        acc_b, acc_a, change, se = paired_change(pb, pa, truth)
        print(f"{t} (n={len(truth):,}): {100 * acc_b:.2f}% -> {100 * acc_a:.2f}%, change {100 * change:+.2f} "
              f"± {100 * se:.2f} points (paired standard error)")


if __name__ == "__main__":
    run_cli(main)
