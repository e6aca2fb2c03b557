"""The shape of the package: layers that only point down (import-linter's contract in pyproject.toml,
the one docs/design.md describes) and modules small enough to read in one sitting."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "splitlearn"
MAX_LINES = 500


def _layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    return layers


def test_the_layers_contract_holds():
    """``lint-imports`` (every import, those inside functions too) finds no module importing a layer above its own."""
    out = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                          "sys.exit(lint_imports(no_cache=True, no_logo=True))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout


def test_the_design_document_lists_the_contracts_layers_in_order():
    """docs/design.md's layer list is the contract's: the same packages, top to bottom."""
    design = (ROOT / "docs" / "design.md").read_text()
    section = design.split("## Layers", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\d+\. \*\*`([^`]+)`\*\*", section, flags=re.M)
    expected = [layer.replace("splitlearn.", "").replace(" ", "") for layer in _layers()]
    assert [entry.replace(" ", "") for entry in listed] == expected


def test_every_package_is_in_a_layer():
    """A new package must be placed in the contract, or nothing would check what it imports."""
    placed = {p.strip().removeprefix("splitlearn.") for layer in _layers() for p in layer.split("|")}
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert packages | modules <= placed, sorted((packages | modules) - placed)


def test_no_module_needs_more_than_one_sitting():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    too_long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"
    assert len(sizes) > 50  # the walk found the package


def test_only_clients_and_the_plan_model_read_plan_clients():
    """One driver: what differs for a ``[clients]`` schedule is asked of ``clients/`` or of the plan model
    (``core/plan.py``, ``core/specs.py``), so no other module reads ``plan.clients`` to branch on it."""
    reads = re.compile(r"\b(plan|p|self\.plan|graph\.plan|body)\.clients\b")
    allowed = ("clients/", "core/plan.py", "core/specs.py")
    found = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py")
             if not str(p.relative_to(PACKAGE)).startswith(allowed)
             for i, line in enumerate(p.read_text().splitlines(), 1) if reads.search(line)]
    assert found == [], found
