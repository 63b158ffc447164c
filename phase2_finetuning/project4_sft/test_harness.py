"""Tests of the evaluation harness: planted answers score exactly as planted, the scorer is the manual sum of
token log-probs, and HumanEval's sandbox passes the canonical solutions and fails the bad ones in time.

    uv run pytest phase2_finetuning/project4_sft/test_harness.py -q          (add -m slow for all 164 problems)
"""

from __future__ import annotations

import json
import math
import random
import time
from itertools import combinations
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from course.paths import REPO_ROOT
from phase1_foundation.project3_pretrain.testing import tiny_llama
from phase2_finetuning.project4_sft.harness import tasks
from phase2_finetuning.project4_sft.harness.gsm8k import evaluate_gsm8k, extract_answer
from phase2_finetuning.project4_sft.harness.humaneval import (check_completions, evaluate_humaneval,
                                                              humaneval_program, pass_at_k, run_program)
from phase2_finetuning.project4_sft.harness.multiple_choice import (continuation_logprobs,
                                                                    evaluate_multiple_choice, mean_and_stderr)
from phase2_finetuning.project4_sft.harness.report import TaskResult, write_report
from phase2_finetuning.project4_sft.harness.tasks import MCItem

DATA = REPO_ROOT / "data"
HAS_HUMANEVAL = (DATA / "humaneval" / "HumanEval.jsonl.gz").is_file()
needs_humaneval = pytest.mark.skipif(not HAS_HUMANEVAL, reason="HumanEval not in data/ (uv run python "
                                     "phase2_finetuning/project4_sft/download_data.py --dataset humaneval)")


class ByteTok:
    """A byte-level tokenizer: id = byte (mod `vocab`, so a tiny model's vocabulary can take it)."""

    def __init__(self, vocab: int = 256):
        self.vocab = vocab

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class Stub(nn.Module):
    """The model interface (forward(idx, logits_to_keep) -> (logits, None), config.block_size) around a rule
    `next_logits(ids) -> (vocab,)` that plants the answers."""

    def __init__(self, next_logits, vocab: int = 256, block_size: int = 4096):
        super().__init__()
        self.next_logits, self.vocab = next_logits, vocab
        self.config = SimpleNamespace(block_size=block_size)
        self.anchor = nn.Parameter(torch.zeros(1))  # so next(model.parameters()) names a device

    def forward(self, idx, targets=None, logits_to_keep: int = 0):
        T = idx.size(1)
        keep = range(T - logits_to_keep, T) if logits_to_keep else range(T)
        return torch.stack([torch.stack([self.next_logits(row[:t + 1].tolist()) for t in keep]) for row in idx]), None


# ---- multiple choice ---------------------------------------------------------------------------------------
def test_planted_multiple_choice_scores_exactly_as_planted():
    # the model loves "z"; all choices have the same length, so the choice with the most z's wins
    z = torch.zeros(256)
    z[ord("z")] = 4.0
    model = Stub(lambda ids: z)
    rng = random.Random(0)
    items, planted = [], [True] * 7 + [False] * 3
    for k, right in enumerate(planted):
        answer = rng.randrange(4)
        zz = answer if right else (answer + 1 + rng.randrange(3)) % 4
        choices = [" zzzz" if c == zz else " " + "".join(rng.choice("abcdef") for _ in range(4)) for c in range(4)]
        items.append(MCItem(str(k), f"Question: q{k}?\nAnswer:", choices, answer))
    r = evaluate_multiple_choice(model, ByteTok(), items, "planted", progress=False)
    assert r.accuracy == 0.7 and r.n == 10
    assert r.stderr == pytest.approx(math.sqrt(0.7 * 0.3 / 9))
    assert r.extra["acc_norm"] == 0.7


def test_loglikelihood_is_the_manual_sum_of_token_logprobs():
    torch.manual_seed(0)
    model = tiny_llama(seed=3)
    context = torch.randint(0, 97, (9,)).tolist()
    conts = [torch.randint(0, 97, (n,)).tolist() for n in (1, 3, 6, 2)]
    got = continuation_logprobs(model, context, conts)
    for c, g in zip(conts, got):
        seq = torch.tensor([context + c])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq)[0][0].double(), -1)
        manual = sum(logp[len(context) + j - 1, c[j]].item() for j in range(len(c)))
        assert g == pytest.approx(manual, abs=1e-4)


def test_one_token_continuations_read_one_row_equal_to_one_row_each():
    model = tiny_llama(seed=4)
    context = torch.randint(0, 97, (11,)).tolist()
    conts = [[t] for t in torch.randint(0, 97, (4,)).tolist()]
    got = continuation_logprobs(model, context, conts)  # the one-row path
    for c, g in zip(conts, got):
        assert g == pytest.approx(continuation_logprobs(model, context, [c, c + [0]])[0], abs=1e-5)  # the batch path


def test_questions_batched_together_score_as_each_alone():
    # several questions per forward pass (sorted, right-padded, classifier only where read) = one at a time,
    # on fresh random items of mixed lengths, one-token and multi-token choices, some cut to the context
    model = tiny_llama(seed=5)
    seed = random.randrange(2**31)
    print(f"seed {seed}")  # pytest shows it when the test fails
    rng = random.Random(seed)
    letters = "abcdefghij "
    items = []
    for k in range(13):
        q = "".join(rng.choice(letters) for _ in range(rng.randrange(1, model.config.block_size + 20)))
        n_tok = 1 if k % 3 == 0 else None
        choices = ["".join(rng.choice(letters) for _ in range(n_tok or rng.randrange(1, 9))) for _ in range(4)]
        items.append(MCItem(str(k), q, choices, rng.randrange(4)))
    tok = ByteTok(vocab=model.config.vocab_size)
    alone = evaluate_multiple_choice(model, tok, items, "t", progress=False, batch_size=1)
    together = evaluate_multiple_choice(model, tok, items, "t", progress=False, batch_size=11)
    assert together.extra["picks"] == alone.extra["picks"] and together.accuracy == alone.accuracy
    for item in items:  # and each question's scores are continuation_logprobs' own
        ctx, conts = tok.encode(item.question), [tok.encode(c) for c in item.choices]
        mine = continuation_logprobs(model, ctx, conts)
        for c, v in zip(conts, mine):
            seq = (ctx + c)[-(model.config.block_size + 1):]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([seq[:-1]]))[0][0].double(), -1)
            manual = sum(logp[len(seq) - 1 - len(c) + j, c[j]].item() for j in range(len(c)))
            assert v == pytest.approx(manual, abs=1e-4)


def test_mean_and_stderr_match_the_sample_formula():
    v = [float(x) for x in torch.randint(0, 2, (50,)).tolist()]
    m, se = mean_and_stderr(v)
    t = torch.tensor(v)
    assert m == pytest.approx(t.mean().item()) and se == pytest.approx((t.std(unbiased=True) / math.sqrt(50)).item())


# ---- GSM8K ---------------------------------------------------------------------------------------------------
def test_gsm8k_answer_extraction():
    assert extract_answer("so 3 + 4 = 7\n#### 7") == "7"
    assert extract_answer("#### 1,200") == "1200"
    assert extract_answer("The answer is $18.") == "18"
    assert extract_answer("2.50 and then 3.0") == "3"
    assert extract_answer("-5 degrees") == "-5"
    assert extract_answer("no numbers") is None


def test_planted_gsm8k_scores_exactly_as_planted():
    rows = [{"question": f"What is {a} plus {a}?", "answer": f"{a}+{a}={2 * a}\n#### {2 * a:,}"}
            for a in (3, 11, 600, 25, 7)]
    outputs = {rows[0]["question"]: " 3+3=6\n#### 6", rows[1]["question"]: " It is 22.",
               rows[2]["question"]: " The total is $1,200.", rows[3]["question"]: " 51",
               rows[4]["question"]: " #### 15\n"}
    tok = ByteTok()

    def next_logits(ids):
        text = tok.decode(ids)
        q = text.rsplit("Question: ", 1)[-1].split("\nAnswer:")[0]
        target = outputs[q] + "\n\nQuestion:"
        written = text.rsplit("\nAnswer:", 1)[-1]
        out = torch.zeros(256)
        out[target.encode()[len(written.encode())]] = 5.0
        return out

    r = evaluate_gsm8k(Stub(next_logits), tok, rows, max_new_tokens=40, progress=False)
    assert r.accuracy == 0.6  # 6, 22, 1200 right; 51 and 15 wrong
    assert r.extra["samples"][1]["output"] == " It is 22."  # the blank line stops generation


# ---- HumanEval ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def problems():
    if not HAS_HUMANEVAL:
        pytest.skip("HumanEval not in data/")
    return tasks.load_humaneval()


@needs_humaneval
def test_canonical_solutions_pass_fast_subset(problems):
    subset = problems[::20]  # 9 problems spread over the set
    results = check_completions(subset, [p["canonical_solution"] for p in subset], progress=False)
    assert [r.status for r in results] == ["passed"] * len(subset)


@pytest.mark.slow
@needs_humaneval
def test_all_164_canonical_solutions_pass(problems):
    results = check_completions(problems, [p["canonical_solution"] for p in problems], progress=False)
    assert sum(r.passed for r in results) == 164, [r.status for r in results if not r.passed]


@needs_humaneval
def test_bad_completions_fail_within_their_time_limit(problems, tmp_path):
    p = problems[0]
    outside = tmp_path / "escaped.txt"
    bad = {
        "    while True:\n        pass\n": "timed out",
        "    import sys\n    sys.exit(0)\n": "exited before the tests finished",
        "    import os\n    os._exit(0)\n": "exited before the tests finished",
        f"    open({str(outside)!r}, 'w').write('x')\n    return True\n": "failed: PermissionError",
        "    raise SystemExit(3)\n": "failed",
    }
    for completion, want in bad.items():
        t0 = time.perf_counter()
        r = run_program(humaneval_program(p, completion), timeout=2.0)
        assert not r.passed and r.status.startswith(want), (completion, r.status)
        assert time.perf_counter() - t0 < 2.0 + 3.0  # the limit plus start-up and kill, on a loaded machine
    assert not outside.exists()
    # a file inside its own temporary directory is fine
    ok = "    open('scratch.txt', 'w').write('x')\n" + p["canonical_solution"]
    assert run_program(humaneval_program(p, ok)).passed


@needs_humaneval
def test_planted_humaneval_pass_at_1(problems):
    subset = problems[:5]
    right = {p["prompt"] for p in subset[:2]}
    canon = {p["prompt"]: p["canonical_solution"] for p in subset}
    r = evaluate_humaneval(None, None, subset, progress=False,
                           generate=lambda m, t, prompt, n, stop: canon[prompt] if prompt in right else "    return None\n")
    assert r.accuracy == 0.4 and r.extra["statuses"] == {"passed": 2, "failed": 3}


def test_pass_at_k_is_the_probability_over_subsets():
    for n, c, k in [(5, 2, 1), (6, 3, 2), (7, 0, 3), (4, 4, 2), (8, 1, 5)]:
        samples = [1] * c + [0] * (n - c)
        subsets = list(combinations(range(n), k))
        brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute)


# ---- data and report -----------------------------------------------------------------------------------------
@pytest.mark.skipif(not (DATA / "arc").is_dir() or not (DATA / "mmlu").is_dir(), reason="ARC/MMLU not in data/")
def test_real_task_files_have_the_documented_sizes():
    assert len(tasks.load_arc("Easy", "Test")) == 2376 and len(tasks.load_arc("Challenge", "Test")) == 1172
    assert len(tasks.mmlu_subjects()) == 57
    five = tasks.load_mmlu("test", shots=5, subjects=["anatomy"])
    assert len(five) == 135 and five[0].question.count("\nAnswer:") == 6 and five[0].choices == [" A", " B", " C", " D"]
    assert five[0].question.startswith("The following are multiple choice questions (with answers) about anatomy.")
    dev = tasks.load_arc("Easy", "Dev")
    shot = tasks.with_shots(dev[5:6], dev[:2], 2)[0]
    assert shot.question.count("Question:") == 3 and shot.question.endswith(dev[5].question)


def test_report_is_json_and_markdown(tmp_path):
    rs = [TaskResult("arc_easy", 10, 0.5, 0.1667, 2.0), TaskResult("gsm8k", 4, 0.25, 0.25, 8.0)]
    js, md = write_report(rs, tmp_path / "report", {"model": "tiny"})
    data = json.loads(js.read_text())
    assert data["meta"]["model"] == "tiny" and data["results"][0]["per_second"] == 5.0
    assert "| arc_easy | 10 | 50.00% | 16.67 | 5.0 |" in md.read_text()


def test_subset_is_fixed_and_stratified():
    items = [MCItem(f"{s}/{k}", "q", [" A"], 0, s) for s in "abc" for k in range(10 if s != "c" else 2)]
    pick = tasks.subset(items, 9, seed=1, key=lambda i: i.subject)
    assert pick == tasks.subset(items, 9, seed=1, key=lambda i: i.subject)
    counts = {s: sum(i.subject == s for i in pick) for s in "abc"}
    assert counts == {"a": 4, "b": 3, "c": 2}  # round-robin until c runs out
    assert tasks.subset(items, 0) == items and len({i.id for i in pick}) == 9


def test_eval_config_rejects_bad_values_with_one_line():
    from course.errors import ConfigError
    from phase2_finetuning.project4_sft.config import EvalConfig

    assert EvalConfig.from_preset("cpu").validate_config().limit == 100
    with pytest.raises(ConfigError, match="tasks"):
        EvalConfig(tasks="arc_easy,squad").validate_config()
    with pytest.raises(ConfigError, match="shots"):
        EvalConfig(shots=9).validate_config()


# ---- the peer comparison (compare_lm_eval.py) -----------------------------------------------------------------
@pytest.mark.parametrize("argv, fragment", [
    (["--tasks", "hellaswag"], "--tasks must be a comma list of arc_easy, mmlu"),
    (["--model", "checkpoints/none.pt"], "builds transformers' tokenizer from a .gguf file"),
    (["--limit", "-1"], "--limit"),
])
def test_compare_lm_eval_bad_input_is_one_line(argv, fragment):
    from course.clitest import one_line_error
    from phase2_finetuning.project4_sft import compare_lm_eval
    assert fragment in one_line_error(compare_lm_eval.main, argv)


@pytest.mark.slow
def test_lm_eval_agrees_with_ours_on_smollm2_questions(tmp_path):
    from phase2_finetuning.project4_sft import compare_lm_eval
    if not (REPO_ROOT / compare_lm_eval.SMOLLM2).is_file():
        pytest.skip(f"{compare_lm_eval.SMOLLM2} absent: project 8's download_model.py --source fetches it")
    compare_lm_eval.main(["--limit", "6", "--out", str(tmp_path / "cmp")])
    rows = json.loads((tmp_path / "cmp.json").read_text())["rows"]
    assert [r["same_pick"] for r in rows] == [1.0, 1.0]


# ---- forgetting.py: the paired change between two reports -----------------------------------------------------
def test_paired_change_is_the_mean_and_standard_error_of_per_question_differences():
    from phase2_finetuning.project4_sft.harness.multiple_choice import paired_change
    rng = random.Random(7)
    truth = [rng.randrange(4) for _ in range(200)]
    before = [t if rng.random() < 0.6 else (t + 1) % 4 for t in truth]
    after = [b if rng.random() < 0.9 else rng.randrange(4) for b in before]
    acc_b, acc_a, change, se = paired_change(before, after, truth)
    d = torch.tensor([float(a == t) - float(b == t) for a, b, t in zip(after, before, truth)], dtype=torch.float64)
    assert acc_a - acc_b == pytest.approx(change) and change == pytest.approx(d.mean().item())
    assert se == pytest.approx((d.std(unbiased=True) / math.sqrt(200)).item())
    indep = math.sqrt(acc_a * (1 - acc_a) / 199 + acc_b * (1 - acc_b) / 199)
    assert se < indep  # same questions answered mostly alike: the paired error is the smaller one


def test_forgetting_refuses_reports_of_different_questions(tmp_path):
    from course.clitest import one_line_error
    from phase2_finetuning.project4_sft import forgetting
    for name, limit in (("a", 10), ("b", 20)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"meta": {"limit": limit}, "results": []}))
    (tmp_path / "bad.json").write_text("{")
    assert "different --limit" in one_line_error(forgetting.main, [str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert "not an evaluate.py JSON report" in one_line_error(forgetting.main, [str(tmp_path / "bad.json"),
                                                                                str(tmp_path / "a.json")])
