"""The shape of the package: layers that only point down (import-linter's contract in pyproject.toml,
the one docs/design.md describes) and modules small enough to read in one sitting."""

import ast
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


def test_the_import_contracts_hold():
    """``lint-imports`` (every import, those inside functions and under TYPE_CHECKING too) finds no module importing
    a layer above its own, no cycle among the modules of any one package, and nothing that trains, serves or launches
    a party importing the audit's active attacks (malicious party implementations)."""
    out = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                          "sys.exit(lint_imports(no_cache=True, no_logo=True))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "3 kept, 0 broken" in out.stdout


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


# -- one home per name: a name is imported from the module that defines it; a module's __all__ lists exactly the
# public names it defines. The packages whose __init__ is their public face are the exceptions.
FACES = {"splitlearn", "splitlearn.api", "splitlearn.data", "splitlearn.models", "splitlearn.privacy",
         "splitlearn.tools.audit", "splitlearn.wire.transport"}
SKIP = {"splitlearn.wire.proto.splitlearn_pb2", "splitlearn.wire.proto.generate"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name not in SKIP and not name.endswith("__main__"):
            out[name] = p
    return out


def _defined(tree: ast.Module) -> tuple[set[str], list[str] | None]:
    names, all_ = set(), None
    for node in tree.body:
        stmts = [node] + ([s for s in ast.walk(node) if isinstance(s, ast.stmt)] if isinstance(node, (ast.If, ast.Try)) else [])
        for s in stmts:
            if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(s.name)
            elif isinstance(s, (ast.Assign, ast.AnnAssign)):
                for t in (s.targets if isinstance(s, ast.Assign) else [s.target]):
                    if isinstance(t, ast.Name) and t.id == "__all__":
                        all_ = [e.value for e in s.value.elts]
                    else:
                        names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names, all_


def _public(tree: ast.Module, names: set[str]) -> set[str]:
    """Defined names not starting with _, but for loggers and TypeVars."""
    private = set()
    for s in tree.body:
        if isinstance(s, ast.Assign) and isinstance(s.value, ast.Call):
            f = ast.unparse(s.value.func)
            if f in ("logging.getLogger", "TypeVar"):
                private |= {t.id for t in s.targets if isinstance(t, ast.Name)}
    return {n for n in names if not n.startswith("_")} - private


def test_every_module_lists_exactly_its_own_public_names():
    wrong = {}
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        defined, all_ = _defined(tree)
        if all_ is None:
            continue
        foreign = [] if name in FACES else sorted(set(all_) - defined)
        missing = sorted(_public(tree, defined) - set(all_))
        if foreign or missing:
            wrong[name] = {"foreign": foreign, "missing": missing}
    assert wrong == {}, wrong


def test_every_import_names_the_module_that_defines_it():
    mods = _modules()
    info = {m: _defined(ast.parse(p.read_text())) for m, p in mods.items()}
    wrong = []
    for top in ("src", "tests", "bench", "examples"):
        for path in (ROOT / top).rglob("*.py"):
            rel = path.relative_to(ROOT)
            here = ".".join(path.relative_to(ROOT / "src").with_suffix("").parts) if top == "src" else None
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ImportFrom) or (node.level and here is None):
                    continue
                if node.level:
                    parts = here.split(".")  # a package's own __init__ counts as a module in it
                    module = ".".join(parts[:len(parts) - node.level] + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module not in info:
                    continue
                defined, all_ = info[module]
                for a in node.names:
                    ok = (a.name in defined or f"{module}.{a.name}" in {*mods, *SKIP} or a.name in ("__version__", "__file__")
                          or (module in FACES and a.name in (all_ or [])))
                    if not ok:
                        wrong.append(f"{rel}:{node.lineno}: from {module} import {a.name}")
    assert wrong == [], wrong


# -- tests use the package as its users do: no private name of it (item 6 of issue #23) ----------------------------
_PRIVATE = r"_(?!_)\w+"  # one leading underscore: dunders (__init__, __file__) are the language's, not private
_ASSIGNED = r"\s*(?::[^=\n]+)?=(?!=)"  # `= ...` or `: type = ...`, not `==`
_DEFINES = re.compile(rf"\b(?:def|class)\s+({_PRIVATE})|\.({_PRIVATE}){_ASSIGNED}|^[ \t]*({_PRIVATE}){_ASSIGNED}", flags=re.M)
_READS = re.compile(rf"(?<=[\w)\]])\.({_PRIVATE})\b")  # after a name, a call or a subscript
_BY_STRING = re.compile(rf"\b(?:get|set|has|del)attr\([^,()]+,\s*[\"']({_PRIVATE})[\"']")
_IMPORTS = re.compile(r"^[ \t]*from\s+splitlearn[\w.]*\s+import\s+(\([^)]*\)|.*)$", flags=re.M)
_ALLOWED = {"os._exit"}


def _private_names(paths) -> set[str]:
    """Private names that ``paths`` define: functions, classes, and names assigned (attributes, or names of a class
    or module)."""
    return {next(g for g in m.groups() if g) for p in paths for m in _DEFINES.finditer(p.read_text())}


def test_no_test_reads_a_private_name_of_the_package():
    """Tests go through the package's public names, as a user does. A private attribute read (one underscore) is the
    tests' own, and allowed, when its receiver is ``self`` or ``cls``, or when the name is defined by the test files
    (tests/*.py) and nowhere in the package (a name both define is taken as the package's); ``os._exit`` is the
    standard library's. Private names given as strings to getattr, setattr (monkeypatch's too), hasattr and delattr,
    or imported from splitlearn count too. Comments are not read; code in strings (a script a test runs) is."""
    tests = sorted((ROOT / "tests").glob("*.py"))
    own = _private_names(tests) - _private_names(PACKAGE.rglob("*.py"))
    found = []
    for path in tests:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for m in _READS.finditer(code):
                receiver = re.search(r"[\w.]*$", code[:m.start()])[0]  # empty after a call or a subscript
                if receiver not in ("self", "cls") and f"{receiver}.{m[1]}" not in _ALLOWED and m[1] not in own:
                    found.append(f"{path.name}:{i}: {receiver}.{m[1]}")
            found += [f"{path.name}:{i}: {line.strip()}" for m in _BY_STRING.finditer(code) if m.group(1) not in own]
        for m in _IMPORTS.finditer(path.read_text()):
            names = re.sub(r"\bas\s+\w+", "", m.group(1))  # an alias is the test's own name
            found += [f"{path.name}: imports {n}" for n in re.findall(rf"\b{_PRIVATE}\b", names)]
    assert found == [], found
