"""The package's layout as README.md draws it: every module listed once, in dependency order.

Reads the source as text (ast), imports nothing: a new module missing from the map, or an import from a module listed
below it fails here with the file and line. (No line counts: a module is as long as its concept needs.)
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "modeling_gwm"
# GWMModel's convenience methods (model.forecast, model.predict_df, the Hub download in from_pretrained) import the
# modules that do the work when called: the one sanctioned upward import.
UPWARD_ALLOWED = {("modeling_gwm", "pipeline"), ("modeling_gwm", "hub")}


def _modules() -> dict[str, Path]:
    """Map-level names: `loop` for the loop/ package, the file stem otherwise (package __init__ files excluded)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.name == "__init__.py" and len(relative.parts) == 1:
            continue
        out.setdefault(relative.parts[0] if len(relative.parts) > 1 else relative.stem, path)
    return out


def _map_order() -> list[str]:
    """Module names in the order README.md's layout section lists them under `modeling_gwm/`."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    return [m.group(1) for m in re.finditer(r"^  (\w+)(?:\.py|/) ", block, re.M)]


def _package_imports(path: Path) -> list[tuple[str, int]]:
    """(map-level module, line) of every relative import in `path`, outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(
        node.test) for n in ast.walk(node)}
    inside_loop = path.parent.name == "loop"
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.level == 0 or id(node) in typing_only:
            continue
        if inside_loop and node.level == 1:
            target = "loop" if node.module else None  # loop's own files
        else:
            target = (node.module or node.names[0].name).split(".")[0]
        if target:
            found.append((target, node.lineno))
    return found


def test_readme_map_lists_every_module_once():
    order = _map_order()
    assert sorted(order) == sorted(_modules()), (order, sorted(_modules()))
    assert len(order) == len(set(order))


def test_modules_import_only_from_modules_above_them_in_the_map():
    rank = {name: i for i, name in enumerate(_map_order())}
    upward = []
    for name, path in _modules().items():
        files = sorted(path.parent.glob("*.py")) if name == "loop" else [path]
        for file in files:
            for target, line in _package_imports(file):
                if target != name and target in rank and rank[target] > rank[name] and (
                        name, target) not in UPWARD_ALLOWED:
                    upward.append(f"{file.relative_to(REPO)}:{line} imports {target}, listed below {name}")
    assert not upward, upward


def test_hub_cards_is_a_leaf_that_imports_nothing_of_modeling_gwm():
    """hub_cards/ (the card templates and their rendering) sits beside modeling_gwm/: modeling_gwm imports it, never
    the other way round."""
    files = sorted((REPO / "hub_cards").rglob("*.py"))
    assert files and (REPO / "hub_cards" / "templates" / "adapter_card.md").is_file()
    upward = []
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            upward += [f"{file.relative_to(REPO)}:{node.lineno} imports {name}" for name in names
                       if name.split(".")[0] == "modeling_gwm"]
    assert not upward, upward
