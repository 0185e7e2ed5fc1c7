"""The package's shape, checked: torch/Lightning internals only in ``_compat.py``, small classes,
a thin strategy, dependencies pointing one way, every package saying what it owns."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lightning_rannc"
SOURCES = sorted(PACKAGE.rglob("*.py"))
FOREIGN = ("torch", "lightning", "lightning_utilities", "pytorch_lightning")
"""Packages whose ``_``-prefixed names are private to them."""
STDLIB = {"_exit"}
"""The standard library's own documented ``_`` names (``os._exit``)."""


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _our_private_names() -> set[str]:
    """Every ``_name`` the package itself defines: functions, classes, attributes it assigns."""
    names: set[str] = set()
    for path in SOURCES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Call) and _string_attribute(node) and _callee(node) == "__setattr__":
                names.add(_string_attribute(node) or "")
    return {n for n in names if _is_private(n)}


def _callee(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _string_attribute(node: ast.Call) -> str | None:
    """``"_x"`` in ``getattr(obj, "_x")``, ``setattr``, ``hasattr``, ``object.__setattr__``."""
    if _callee(node) in ("getattr", "setattr", "hasattr", "delattr", "__setattr__", "__getattribute__"):
        if len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            return node.args[1].value
    return None


def _is_aten_namespace(node: ast.expr) -> bool:
    # ATen operators whose names start with "_" (aten._scaled_dot_product_...) are ops, not internals.
    return (isinstance(node, ast.Name) and node.id in ("aten", "_aten")) or (
        isinstance(node, ast.Attribute) and node.attr == "aten"
    )


def _foreign_private_uses(path: Path, ours: set[str]) -> list[str]:
    found = []
    for node in ast.walk(_tree(path)):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in FOREIGN:
            private = [a.name for a in node.names if _is_private(a.name)]
            if any(_is_private(part) for part in node.module.split(".")) or private:
                found.append(f"{where} from {node.module} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Import):
            foreign = [a.name for a in node.names if a.name.split(".")[0] in FOREIGN]
            found += [f"{where} import {name}" for name in foreign if any(map(_is_private, name.split(".")))]
        elif isinstance(node, ast.Attribute) and _is_private(node.attr) and node.attr not in ours | STDLIB:
            if not _is_aten_namespace(node.value):
                found.append(f"{where} .{node.attr}")
        elif isinstance(node, ast.Call) and _string_attribute(node):
            name = _string_attribute(node) or ""
            if _is_private(name) and name not in ours:
                found.append(f"{where} {_callee(node)}(..., {name!r})")
    return found


def test_private_torch_and_lightning_names_are_used_only_in_the_compat_module() -> None:
    ours = _our_private_names()
    found = [use for path in SOURCES if path.name != "_compat.py" for use in _foreign_private_uses(path, ours)]
    assert not found, "use a shim of lightning_rannc/_compat.py instead:\n" + "\n".join(found)


def test_the_check_itself_finds_private_uses(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import torch\nfrom torch.utils._pytree import tree_flatten\nfrom lightning.fabric import _x\n"
        "torch._C._foo()\ngetattr(m, '_trainer')\nself._mine = 1\ntorch.ops.aten._softmax.default\n"
    )
    found = _foreign_private_uses(sample, ours={"_mine"})
    assert len(found) == 5 and not any("_softmax" in use or "_mine" in use for use in found)


def _class_lengths() -> dict[str, int]:
    lengths = {}
    for path in SOURCES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ClassDef):
                lengths[f"{path.name}:{node.name}"] = (node.end_lineno or node.lineno) - node.lineno + 1
    return lengths


def test_no_class_is_over_400_lines_and_the_strategy_holds_only_hooks() -> None:
    too_long = {name: n for name, n in _class_lengths().items() if n > 400}
    assert not too_long
    assert len((PACKAGE / "strategy.py").read_text().splitlines()) <= 450


def _imports(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
    return modules


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("capture", ("lightning_rannc.runtime", "lightning_rannc.strategy", "lightning_rannc.integration")),
        ("plan", ("lightning_rannc.runtime", "lightning_rannc.strategy", "lightning_rannc.integration", "torch")),
        ("profile", ("lightning_rannc.runtime", "lightning_rannc.strategy", "lightning_rannc.integration")),
        ("runtime", ("lightning_rannc.strategy", "lightning_rannc.integration")),
    ],
)
def test_dependencies_point_down(package: str, forbidden: tuple[str, ...]) -> None:
    """capture and plan import nothing of runtime or the strategy; plan imports no torch at all
    (so no torch.distributed): it works on arrays of costs."""
    for path in sorted((PACKAGE / package).rglob("*.py")):
        wrong = {m for m in _imports(path) if any(m == f or m.startswith(f + ".") for f in forbidden)}
        assert not wrong, f"{path.name} imports {sorted(wrong)}"


def test_every_package_folder_says_what_it_owns_and_may_import() -> None:
    for init in sorted(PACKAGE.rglob("__init__.py")):
        doc = ast.get_docstring(_tree(init)) or ""
        assert len(doc) > 80 and "import" in doc, f"{init.relative_to(PACKAGE.parent)} needs a docstring"
