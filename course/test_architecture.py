"""The course's dependency rules, checked by reading every .py file's imports (ast only: nothing is executed).

THE RULES (GUIDE.md, "How projects depend on each other")
1. A file of project N imports only `course/`, its own project, and lower-numbered projects.
2. A library never imports a script. A script never imports another script (what two scripts share moves into
   a library module of the project that owns the concept). A test may import the scripts of its own project
   (to call their `main` or a function they define), not another project's.
3. No import circles among libraries and scripts, counting imports inside functions too: a lazy import only
   hides a circle from Python, not from a reader.

WHICH FILE IS WHAT. The kind is decided by the file name, so that it is visible in a directory listing:
- test: `test_*.py`, `conftest.py`;
- script: the names in SCRIPT_PATTERNS (train.py, train_*.py, generate.py, evaluate.py, evaluate_*.py, benchmark*.py,
  download_*.py, prepare_data.py, export_hf.py, chat.py, serve.py, compare_*.py, make_*.py): the commands of the
  READMEs;
- library: everything else. A library may still carry a small `if __name__ == "__main__":` demo (model.py
  prints a preset's parameter count), but the name says it is a library, so everything may import it, and its
  demo obeys the library rules.
Imports under `if TYPE_CHECKING:` are kept: they are read by people, and a circle there is still a circle.

Run: uv run pytest -q course/test_architecture.py
"""

from __future__ import annotations

import ast
import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from course.paths import REPO_ROOT

SCRIPT_PATTERNS = ("train.py", "train_*.py", "generate.py", "evaluate.py", "evaluate_*.py", "benchmark*.py",
                   "download_*.py", "prepare_data.py", "export_hf.py", "chat.py", "serve.py", "compare_*.py", "make_*.py")
TEST_PATTERNS = ("test_*.py", "conftest.py")
PACKAGE_ROOTS = ("course", "phase*")  # the top-level packages of the repo
SKIP_DIRS = {"__pycache__", ".venv", "data", "checkpoints", "build", "dist"}
PROJECT_DIR = re.compile(r"^project(\d+)_")


@dataclass
class Module:
    name: str            # dotted, e.g. phase1_foundation.project3_pretrain.loading
    path: Path
    kind: str            # "library" | "script" | "test"
    project: int | None  # 0 for course/, N for projectN_*, None for a phase package's __init__
    imports: dict[str, int] = field(default_factory=dict)  # internal module -> first line importing it


def kind_of(filename: str) -> str:
    if any(fnmatch.fnmatch(filename, p) for p in TEST_PATTERNS):
        return "test"
    if any(fnmatch.fnmatch(filename, p) for p in SCRIPT_PATTERNS):
        return "script"
    return "library"


def project_of(rel: Path) -> int | None:
    if rel.parts[0] == "course":
        return 0
    for part in rel.parts[1:-1]:
        m = PROJECT_DIR.match(part)
        if m:
            return int(m.group(1))
    return None


def find_modules(root: Path) -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for top in sorted(p for pattern in PACKAGE_ROOTS for p in root.glob(pattern) if p.is_dir()):
        for path in sorted(top.rglob("*.py")):
            rel = path.relative_to(root)
            if SKIP_DIRS & set(rel.parts[:-1]):
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join(parts)
            modules[name] = Module(name, path, kind_of(path.name), project_of(rel))
    return modules


def _is_package(mod: Module) -> bool:
    return mod.path.name == "__init__.py"


def read_imports(mod: Module, modules: dict[str, Module]) -> None:
    """Fill mod.imports with every internal module it imports, anywhere in the file (functions included)."""
    tree = ast.parse(mod.path.read_text(encoding="utf-8"), filename=str(mod.path))
    package = mod.name if _is_package(mod) else mod.name.rpartition(".")[0]

    def add(target: str, line: int) -> None:
        # `import a.b.c` imports a, a.b and a.b.c; only the deepest internal module is the dependency
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != mod.name:
            mod.imports.setdefault(target, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from ..p import y
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                name = f"{source}.{alias.name}"
                add(name if name in modules else source, node.lineno)


def find_cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), tests left out."""
    graph = {n: [t for t in m.imports if modules[t].kind != "test"] for n, m in modules.items() if m.kind != "test"}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # recursion depth is bounded by the number of modules (a few hundred)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def violations(root: Path) -> list[str]:
    """Every broken rule under root, one readable line each (empty when the tree is clean)."""
    modules = find_modules(root)
    for mod in modules.values():
        read_imports(mod, modules)
    out = []
    for mod in modules.values():
        rel = mod.path.relative_to(root)
        for target, line in sorted(mod.imports.items()):
            dep = modules[target]
            where = f"{rel}:{line} imports {target}"
            if mod.project is not None and dep.project is not None and dep.project > mod.project:
                out.append(f"{where}: project {mod.project} may not import project {dep.project} (higher-numbered)")
            if dep.kind == "script":
                if mod.kind == "library":
                    out.append(f"{where}: a library imports a script; move what it needs into a library module")
                elif mod.kind == "script":
                    out.append(f"{where}: a script imports another script; move what they share into a library")
                elif dep.project != mod.project:
                    out.append(f"{where}: a test imports another project's script; import its library instead")
    for cycle in find_cycles(modules):
        out.append(f"import circle: {' <-> '.join(cycle)}")
    return out


# ---- the repository --------------------------------------------------------------------------------
def test_the_course_obeys_its_dependency_rules():
    found = violations(REPO_ROOT)
    assert not found, f"{len(found)} broken dependency rule(s):\n" + "\n".join(found)


def test_every_project_folder_and_script_is_seen():
    """Guards the walk itself: a checker that found no files would pass every tree."""
    modules = find_modules(REPO_ROOT)
    projects = {m.project for m in modules.values() if m.project}
    assert {1, 2, 3, 8} <= projects, projects
    assert modules["phase1_foundation.project3_pretrain.train"].kind == "script"
    assert modules["phase1_foundation.project3_pretrain.loading"].kind == "library"
    assert kind_of("train_tokenizer.py") == kind_of("benchmark_gguf.py") == "script"
    assert kind_of("evaluate_mmlu.py") == kind_of("compare_lm_eval.py") == kind_of("download_model.py") == "script"
    assert kind_of("training.py") == kind_of("generation.py") == "library"  # names that only start like a script's
    assert modules["course.test_architecture"].kind == "test"
    mod = modules["phase1_foundation.project3_pretrain.loading"]
    read_imports(mod, modules)
    assert "phase1_foundation.project3_pretrain.hf_interop" in mod.imports


# ---- the checker catches each kind of fault -----------------------------------------------------------
def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for d in list(root.rglob("*")):  # every folder a package
        if d.is_dir() and not (d / "__init__.py").exists():
            (d / "__init__.py").write_text("")
    return root


CLEAN = {
    "course/errors.py": "",
    "phase1_x/project1_a/model.py": "from course.errors import *\n",
    "phase1_x/project1_a/train.py": "from phase1_x.project1_a.model import *\n",
    "phase1_x/project1_a/test_a.py": "from phase1_x.project1_a import train\n",
    "phase1_x/project2_b/lib.py": "from phase1_x.project1_a import model\nfrom . import other\n",
    "phase1_x/project2_b/other.py": "def f():\n    from phase1_x.project1_a.model import GPT\n",
    "phase1_x/project2_b/generate.py": "from .lib import *\nif __name__ == '__main__':\n    pass\n",
}


@pytest.mark.parametrize("name,files,expected", [
    ("library imports a script", {"phase1_x/project2_b/lib.py": "def f():\n    from phase1_x.project1_a import train\n"},
     "a library imports a script"),
    ("script imports a script", {"phase1_x/project2_b/generate.py": "import phase1_x.project1_a.train\n"},
     "a script imports another script"),
    ("relative import of a script", {"phase1_x/project2_b/other.py": "from .generate import main\n"},
     "a library imports a script"),
    ("test imports another project's script", {"phase1_x/project2_b/test_b.py": "from phase1_x.project1_a.train import x\n"},
     "a test imports another project's script"),
    ("higher-numbered project", {"phase1_x/project1_a/model.py": "from phase1_x.project2_b.lib import y\n"},
     "project 1 may not import project 2"),
    ("course imports a project", {"course/errors.py": "import phase1_x.project1_a.model\n"},
     "project 0 may not import project 1"),
    ("circle", {"phase1_x/project2_b/other.py": "from phase1_x.project2_b.lib import z\n"},
     "import circle: phase1_x.project2_b.lib <-> phase1_x.project2_b.other"),
])
def test_the_checker_finds_each_fault(tmp_path, name, files, expected):
    assert violations(_tree(tmp_path / "clean", dict(CLEAN))) == []
    found = violations(_tree(tmp_path / "bad", {**CLEAN, **files}))
    assert any(expected in line for line in found), found
