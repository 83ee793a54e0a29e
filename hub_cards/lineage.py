"""The lineage graph of a DAG run: a mermaid `graph TD` drawn from a DAG as dag.json records it,
{"order": [...], "nodes": {name: {"parents", "merge", "status"}}}: what the model cards show and `gwm dag` prints."""

from __future__ import annotations

from .render import format_value


def ancestors(nodes: dict, node: str) -> list[str]:
    """`node` and every ancestor, parents before children (the order they were trained in)."""
    seen: list[str] = []

    def visit(name: str) -> None:
        if name in seen:
            return
        for parent in (nodes.get(name) or {}).get("parents") or []:
            visit(parent)
        seen.append(name)

    visit(node)
    return seen


def parent_weights(entry: dict) -> dict[str, float | None]:
    """Each parent's merge weight of a dag.json node entry, from `merge.weights` given as a list (parents' order) or a
    {parent: w} dict."""
    parents = entry.get("parents") or []
    weights = (entry.get("merge") or {}).get("weights")
    if isinstance(weights, dict):
        return {p: weights.get(p) for p in parents}
    if isinstance(weights, (list, tuple)) and len(weights) == len(parents):
        return dict(zip(parents, weights))
    if len(parents) > 1:  # a join without recorded weights averages its parents
        return {p: 1.0 / len(parents) for p in parents}
    return {p: None for p in parents}


def lineage_mermaid(dag: dict, node: str | None = None) -> str:
    """A mermaid `graph TD` of `node` and its ancestors (the whole DAG when `node` is None), from a DAG as dag.json
    records it: what `gwm dag` prints and the model cards show.

    Fork edges say `fork`; join edges carry the merge method and that parent's weight, e.g. `"linear 0.5"`; the node
    of a card is highlighted, and nodes not yet done are dashed.
    """
    nodes = dag.get("nodes") or {}
    names = list(dict.fromkeys([*(dag.get("order") or []), *nodes])) if node is None else ancestors(nodes, node)
    ids = {name: f"n{i}" for i, name in enumerate(names)}
    lines = ["graph TD"]
    for name in names:
        entry = nodes.get(name) or {}
        kind = "join" if len(entry.get("parents") or []) > 1 else "fork" if entry.get("parents") else "root"
        lines.append(f'    {ids[name]}["{name}<br/><small>{kind}</small>"]')
    for name in names:
        entry = nodes.get(name) or {}
        parents = entry.get("parents") or []
        method = (entry.get("merge") or {}).get("method") or "linear"
        for parent, weight in parent_weights(entry).items():
            if parent not in ids:
                continue
            label = "fork" if len(parents) == 1 else f"{method} {format_value(weight, 3)}"
            lines.append(f'    {ids[parent]} -- "{label}" --> {ids[name]}')
    if node is not None:
        lines.append(f"    style {ids[node]} fill:#ffd54f,stroke:#f57f17,stroke-width:2px")
    for name in names:
        status = (nodes.get(name) or {}).get("status")
        if status and status != "done" and name != node:
            lines.append(f"    style {ids[name]} stroke-dasharray: 4 3")
    return "\n".join(lines)


__all__ = ["ancestors", "lineage_mermaid", "parent_weights"]
