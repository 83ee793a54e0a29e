"""The package's layout as README.md draws it: every module listed once, in dependency order, in its sub-package.

Reads the source as text (ast), imports nothing. A new module missing from the map, an import from a module listed
below it, a private name (`_x`) imported from another module, or hub_cards importing modeling_gwm fails here with the
file and line. (No line counts: a module is as long as its concept needs.)
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "modeling_gwm"
UNITS = {"model.loop"}  # a package counted as one module of the map (the loop PEFT method: config, layer, model)
# GWMModel's convenience methods (model.forecast, model.predict_df, the Hub download in from_pretrained) import the
# modules that do the work when called: the sanctioned upward imports.
UPWARD_ALLOWED = {("model.modeling_gwm", "forecasting.pipeline"), ("model.modeling_gwm", "hub.hub")}


def _dotted(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(dotted: str) -> str | None:
    """The map entry a dotted module belongs to (`model.loop.layer` -> `model.loop`); None for package __init__s."""
    for unit in UNITS:
        if dotted == unit or dotted.startswith(unit + "."):
            return unit
    return dotted


def _modules() -> dict[str, list[Path]]:
    """Map entries -> their files. Package __init__ files (the public API, sub-package docstrings) are not entries."""
    out: dict[str, list[Path]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        dotted = _dotted(path)
        if path.name == "__init__.py" and dotted not in UNITS:
            continue
        out.setdefault(_unit(dotted), []).append(path)
    return out


def _map_order() -> list[str]:
    """Entries in the order README.md's layout section lists them under `modeling_gwm/` (sub-packages indented)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    block = block.split("modeling_gwm/", 1)[1]
    order, package = [], None
    for line in block.splitlines():
        m = re.match(r"^( {2,4})([a-z]\w*)(\.py|/) ", line + " ")
        if not m:
            if re.match(r"^\S", line):  # the next top-level folder: the package's map has ended
                break
            continue
        indent, name, kind = m.groups()
        if len(indent) == 2:
            package = name if kind == "/" else None
            if kind == ".py":
                order.append(name)
        elif package:
            order.append(f"{package}.{name}")
    return order


def _imports(path: Path) -> list[tuple[str, int, list[str]]]:
    """(absolute dotted module under modeling_gwm, line, imported names) of every package import in `path`, outside
    `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(
        node.test) for n in ast.walk(node)}
    here = _dotted(path).split(".") if path.name == "__init__.py" else _dotted(path).split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or id(node) in typing_only:
            continue
        if node.level:
            base = here[: len(here) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        elif node.module and (node.module == "modeling_gwm" or node.module.startswith("modeling_gwm.")):
            target = node.module.removeprefix("modeling_gwm").lstrip(".")
        else:
            continue
        names = [a.name for a in node.names]
        if not node.module or target in _subpackages():  # from . import checkpoint: the names are modules
            found += [(f"{target}.{n}".lstrip("."), node.lineno, []) for n in names]
        else:
            found.append((target, node.lineno, names))
    return found


def _subpackages() -> set[str]:
    return {_dotted(p) for p in PACKAGE.rglob("__init__.py")}


def test_readme_map_lists_every_module_once():
    order = _map_order()
    assert sorted(order) == sorted(_modules()), (order, sorted(_modules()))
    assert len(order) == len(set(order))


def test_modules_import_only_from_modules_above_them_in_the_map():
    rank = {name: i for i, name in enumerate(_map_order())}
    upward = []
    for name, files in _modules().items():
        for file in files:
            for target, line, _ in _imports(file):
                target = _unit(target)
                if target != name and target in rank and rank[target] > rank[name] and (
                        name, target) not in UPWARD_ALLOWED:
                    upward.append(f"{file.relative_to(REPO)}:{line} imports {target}, listed below {name}")
    assert not upward, upward


def test_no_private_name_is_imported_across_modules():
    """What crosses a module boundary has a public name: no `from .x import _y`, no `x._y` on an imported module."""
    modules = {_dotted(p) for p in PACKAGE.rglob("*.py")}
    private = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = _unit(_dotted(path))
        imported_modules = set()
        for target, line, names in _imports(path):
            if not names:
                imported_modules.add(target.rsplit(".", 1)[-1])
            for n in names:
                if f"{target}.{n}" in modules:
                    imported_modules.add(n)
                elif n.startswith("_") and not n.startswith("__") and _unit(target) != here:
                    private.append(f"{path.relative_to(REPO)}:{line} imports {n} from {target}")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in
                    imported_modules and node.attr.startswith("_") and not node.attr.startswith("__")):
                private.append(f"{path.relative_to(REPO)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not private, private


def test_hub_cards_does_not_import_modeling_gwm():
    """hub_cards (the card templates and their rendering) is a leaf: modeling_gwm imports it, never the reverse."""
    found = []
    for path in sorted((REPO / "hub_cards").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{path.relative_to(REPO)}:{node.lineno}" for n in names if n.split(".")[0] == "modeling_gwm"]
    assert (REPO / "hub_cards" / "__init__.py").is_file()
    assert not found, found
