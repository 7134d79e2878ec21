"""The direction of imports: core <- strategies <- sampler/train; model <- sampler/train.

Strategies are pure layouts over the core types: a tool or data worker that only lays out
examples must not load jax or flax. A package another builds on never imports it back
(`slm.train` uses `slm.parallel`), and nothing imports the CLI.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import REPO

SLM = pathlib.Path(REPO) / "slm"
CORE = ("types.py", "config.py", "vocab.py", "errors.py")


def imports(path: pathlib.Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function (`from a import b` counts
    as both `a` and `a.b`, as b may be a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def breaches(files: list[pathlib.Path], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{path.relative_to(REPO)} imports {name}" for path in files
                  for name in imports(path)
                  if any(name == f or name.startswith(f + ".") for f in forbidden))


def test_strategies_load_no_jax_or_flax():
    code = ("import sys, slm.strategies; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'flax'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"importing slm.strategies loads {done.stdout.strip()}"


@pytest.mark.parametrize("files, forbidden", [
    ([SLM / name for name in CORE], ("jax", "flax", "slm.model", "slm.strategies")),
    (sorted((SLM / "strategies").glob("*.py")), ("jax", "flax", "slm.model", "slm.train")),
    (sorted((SLM / "parallel").glob("*.py")), ("slm.train",)),
    ([p for p in SLM.rglob("*.py") if "cli" not in p.relative_to(SLM).parts], ("slm.cli",)),
], ids=["core", "strategies", "parallel", "not-the-cli"])
def test_no_module_imports_against_the_layering(files, forbidden):
    """Checked in the source, so an import inside a function (run only on some path) counts."""
    assert files
    assert not breaches(files, forbidden)
