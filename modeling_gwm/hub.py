"""Sharing GWM adapters on the Hugging Face Hub: model cards, loss plots, pushes, loading by Hub id.

How a curriculum is published: one model repo per run, one subfolder per DAG node (and `final/` when the run has
one), with the run's `dag.json`, an index card and the curriculum's loss plot at the repo root:

    user/repo
    ├── README.md  dag.json  loss_curves.png        the run: index of nodes + the whole DAG as a mermaid graph
    ├── macro/     adapter_config.json  adapter_model.safetensors  README.md  loss_curve.png  metrics.json
    ├── markets/   ...
    └── world/     ...

One repo keeps the nodes of a run together (one commit, one history, one place to browse the lineage); subfolders
rather than branches because `from_pretrained(..., subfolder=...)` is how PEFT and transformers already address a
model inside a repo, and a branch per node would hide the DAG. Load one node with

    GWMModel.from_pretrained("THUDM/CogVideoX-2b", "user/repo", subfolder="world")

Only adapter files, cards, plots and metrics go up, chosen by an allow-list (`NODE_FILES`, `RUN_FILES`): never
checkpoints, never frozen weights. A token is only ever handed to `huggingface_hub.HfApi`; it is never logged or
written, and a push refuses to upload a file that contains it.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import quote

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, constants
from huggingface_hub.errors import OfflineModeIsEnabled

logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "hub_cards"
ADAPTER_CARD_TEMPLATE = TEMPLATE_DIR / "adapter_card.md"
CURRICULUM_CARD_TEMPLATE = TEMPLATE_DIR / "curriculum_card.md"

NODE_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md", "loss_curve.png", "metrics.json")
RUN_FILES = ("README.md", "dag.json", "loss_curves.png")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
FINAL_NODE = "final"

CARD_TAGS = ["gwm", "world-model", "cogvideox", "peft", "time-series"]
PIPELINE_TAG = "time-series-forecasting"
DEFAULT_LICENSE = "apache-2.0"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Adapter state-dict key fragments -> budget rows, most specific first.
_BUDGET_GROUPS = (
    ("loop_emb_enc", "Loop embeddings, encoder token (blocks x loops x inner_dim)"),
    ("loop_emb", "Loop embeddings (blocks x loops x inner_dim)"),
    ("loop_gate", "Loop gates (blocks x loops)"),
    ("loop_block", "Per-adapter block copies (scratch backbone)"),
    ("encoder_token", "Encoder conditioning token"),
    ("proj_in", "proj_in (d_model -> inner_dim)"),
    ("proj_out", "proj_out (inner_dim -> d_model)"),
    ("norm_out", "Output LayerNorm"),
    ("codec", "Field codec (value encoder, field/mask embeddings, value head)"),
)


class HubOfflineError(ConnectionError):
    """The Hub cannot be reached (HF_HUB_OFFLINE=1 or no network); nothing local was changed."""


# ---------------------------------------------------------------------------------------------------- reading a run
def _read_json(path: Path) -> dict:
    """A JSON file as a dict; {} when it does not exist, one clear error when it is not JSON."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _node_dir(output_dir: Path, dag: dict, node: str) -> Path:
    relpath = (dag.get("nodes", {}).get(node) or {}).get("output") or node
    return output_dir / relpath


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and bool(_HUB_ID.match(str(name))) and not os.path.exists(str(name))


def _fmt(value, digits: int = 4) -> str:
    """Numbers for people: 4 significant digits, thousands separators for integers, '—' when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:.{digits}g}"


def _base_names(base: str | None) -> tuple[str, str]:
    """(`base_model` metadata, Python expression for the usage snippet) for a base name or path."""
    from .base import TINY_BASE_PATH

    if not base:
        return "THUDM/CogVideoX-2b", '"THUDM/CogVideoX-2b"'
    if os.path.exists(base) and os.path.realpath(base) == os.path.realpath(TINY_BASE_PATH):
        return os.path.basename(TINY_BASE_PATH), "TINY_BASE_PATH"
    if _is_hub_id(base):
        return base, json.dumps(base)
    return os.path.basename(os.path.normpath(base)), json.dumps(base)


# ---------------------------------------------------------------------------------------------------- lineage
def _ancestors(nodes: dict, node: str) -> list[str]:
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


def _parent_weights(entry: dict) -> dict[str, float | None]:
    """Each parent's merge weight, from `merge.weights` given as a list (parents' order) or a {parent: w} dict."""
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
    """A mermaid `graph TD` of `node` and its ancestors (the whole DAG when `node` is None).

    Fork edges say `fork`; join edges carry the merge method and that parent's weight, e.g. `"linear 0.5"`.
    """
    nodes = dag.get("nodes") or {}
    if node is None:
        names = list(dict.fromkeys([*(dag.get("order") or []), *nodes]))
    else:
        names = _ancestors(nodes, node)
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
        for parent, weight in _parent_weights(entry).items():
            if parent not in ids:
                continue
            label = "fork" if len(parents) == 1 else f"{method} {_fmt(weight, 3)}"
            lines.append(f'    {ids[parent]} -- "{label}" --> {ids[name]}')
    if node is not None:
        lines.append(f"    style {ids[node]} fill:#ffd54f,stroke:#f57f17,stroke-width:2px")
    for name in names:
        status = (nodes.get(name) or {}).get("status")
        if status and status != "done" and name != node:
            lines.append(f"    style {ids[name]} stroke-dasharray: 4 3")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- budget
def adapter_budget(adapter_dir: str | os.PathLike) -> list[dict]:
    """Trainable parameters of a saved adapter, grouped by component (read from the safetensors header only)."""
    from safetensors import safe_open

    path = Path(adapter_dir) / "adapter_model.safetensors"
    counts: dict[str, int] = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            n = math.prod(handle.get_slice(key).get_shape())
            group = next((label for frag, label in _BUDGET_GROUPS if frag in key), "Other")
            counts[group] = counts.get(group, 0) + n
    order = [label for _, label in _BUDGET_GROUPS] + ["Other"]
    return [{"component": g, "params": counts[g], "trainable": True} for g in order if g in counts]


def frozen_block_params(gwm_config: dict) -> int | None:
    """Parameters of the frozen blocks the adapter runs on: from a local base's safetensors header, or from the
    architecture of a published CogVideoX (meta device, nothing downloaded). None when it cannot be known offline."""
    base = gwm_config.get("base_model_name_or_path")
    if gwm_config.get("backbone") == "scratch" or not base:
        return None
    weights = sorted(Path(base, "transformer").glob("*.safetensors")) if os.path.isdir(base) else []
    if weights:
        from safetensors import safe_open

        total = 0
        for file in weights:
            with safe_open(str(file), framework="pt") as handle:
                total += sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys()
                             if k.startswith("transformer_blocks."))
        return total
    from .base import COGVIDEOX_ARCHITECTURES, load_cogvideox_base

    if base in COGVIDEOX_ARCHITECTURES:
        frozen = load_cogvideox_base(base, architecture=COGVIDEOX_ARCHITECTURES[base])
        return sum(p.numel() for p in frozen.blocks.parameters())
    return None


def budget_rows(adapter_dir: str | os.PathLike, gwm_config: dict) -> list[dict]:
    """The card's parameter-budget table: trainable components, total, frozen blocks and the trainable share."""
    rows = adapter_budget(adapter_dir)
    trainable = sum(r["params"] for r in rows)
    frozen = frozen_block_params(gwm_config)
    table = [{"component": r["component"], "params": _fmt(r["params"]), "trainable": "yes"} for r in rows]
    table.append({"component": "**Total trainable**", "params": f"**{_fmt(trainable)}**", "trainable": "yes"})
    if frozen is not None:
        table.append({"component": "Frozen CogVideoX blocks", "params": _fmt(frozen), "trainable": "no"})
        share = 100.0 * trainable / (trainable + frozen)
        table.append({"component": "Trainable share", "params": f"{share:.3g} %", "trainable": ""})
    return table


# ---------------------------------------------------------------------------------------------------- plots
def _history(metrics: dict) -> tuple[list, list, list, list]:
    train = [(h.get("step"), h.get("train_loss")) for h in metrics.get("history") or []]
    val = [(h.get("step"), h.get("val_loss")) for h in metrics.get("val_history") or []]
    train = [(s, v) for s, v in train if s is not None and v is not None]
    val = [(s, v) for s, v in val if s is not None and v is not None]
    return [s for s, _ in train], [v for _, v in train], [s for s, _ in val], [v for _, v in val]


def _ema(values: list[float], span: int) -> list[float]:
    alpha, out, acc = 2.0 / (span + 1), [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def _finish_axes(ax, values: list[float]) -> None:
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    ax.set_ylabel("pinball loss (window-scaled units)")
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False)


def plot_node_loss(metrics: dict, path: str | os.PathLike | io.BytesIO, title: str | None = None) -> None:
    """One node's training loss (raw and smoothed) and validation loss against step, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, safe in any process

    node = title or metrics.get("node") or "node"
    steps, train, vsteps, val = _history(metrics)
    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    if train:
        smooth = len(train) > 20
        ax.plot(steps, train, color="tab:blue", alpha=0.35 if smooth else 1.0, lw=1,
                label="train loss" + (" (raw)" if smooth else ""))
        if smooth:
            ax.plot(steps, _ema(train, max(5, len(train) // 20)), color="tab:blue", lw=2, label="train loss (EMA)")
    if val:
        ax.plot(vsteps, val, color="tab:orange", marker="o", lw=2, label="validation loss")
    if not train and not val:
        ax.text(0.5, 0.5, "no loss history recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"GWM node '{node}': loss")
    ax.set_xlabel("optimiser step")
    _finish_axes(ax, train + val)
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_loss_curves(output_dir: str | os.PathLike, path: str | os.PathLike | io.BytesIO) -> None:
    """Every trained node of a run on one axis, in training order (steps laid end to end), as a PNG."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    output_dir = Path(output_dir)
    dag = _read_json(output_dir / "dag.json")
    names = list(dict.fromkeys([*(dag.get("order") or []), *(dag.get("nodes") or {})]))
    fig = Figure(figsize=(9, 4.5), dpi=110)
    ax = fig.subplots()
    offset, all_values, colors = 0, [], colormaps["tab10"]
    for i, name in enumerate(names):
        metrics = _read_json(_node_dir(output_dir, dag, name) / "metrics.json")
        steps, train, vsteps, val = _history(metrics)
        if not train and not val:
            continue
        color = colors(i % 10)
        if train:
            shown = _ema(train, max(5, len(train) // 20)) if len(train) > 20 else train
            ax.plot([offset + s for s in steps], shown, color=color, lw=1.6, label=f"{name} train")
        if val:
            ax.plot([offset + s for s in vsteps], val, color=color, lw=1.2, ls="--", marker="o", ms=3,
                    label=f"{name} val")
        end = offset + max(steps + vsteps)
        ax.axvline(end, color="grey", lw=0.6, alpha=0.5)
        offset, all_values = end, all_values + train + val
    if not all_values:
        ax.text(0.5, 0.5, "no node has a loss history yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("GWM curriculum: loss per node, in training order")
    ax.set_xlabel("optimiser step (nodes laid end to end)")
    _finish_axes(ax, all_values)
    fig.tight_layout()
    fig.savefig(path, format="png")


# ---------------------------------------------------------------------------------------------------- cards
def _sources(metrics: dict) -> tuple[list[str], list[str]]:
    """(human lines describing the data, Hub dataset ids) from metrics' `sources` (names or dicts)."""
    lines, hub_ids = [], []
    for source in metrics.get("sources") or []:
        if not isinstance(source, dict):
            lines.append(f"`{source}`")
            continue
        name = source.get("name") or source.get("path") or "source"
        span = " – ".join(str(source[k]) for k in ("start", "end") if source.get(k))
        hub_id = source.get("hub_dataset") or source.get("dataset_id") or source.get("hf_dataset")
        if _is_hub_id(hub_id):
            hub_ids.append(hub_id)
        extra = [f"dataset [`{hub_id}`](https://huggingface.co/datasets/{hub_id})" if hub_id else "",
                 span, source.get("frequency") or ""]
        extra = [e for e in extra if e]
        lines.append(f"`{name}`" + (f" ({', '.join(extra)})" if extra else ""))
    return lines, hub_ids


def _date_range(metrics: dict) -> str | None:
    span = metrics.get("date_range")
    if isinstance(span, dict) and (span.get("start") or span.get("end")):
        return f"{span.get('start', '?')} – {span.get('end', '?')}"
    starts = [s.get("start") for s in metrics.get("sources") or [] if isinstance(s, dict) and s.get("start")]
    ends = [s.get("end") for s in metrics.get("sources") or [] if isinstance(s, dict) and s.get("end")]
    if starts and ends:
        return f"{min(map(str, starts))} – {max(map(str, ends))}"
    return None


def _retention_rows(entry: dict) -> list[dict]:
    rows = []
    for parent, r in (entry.get("retention") or {}).items():
        r = r or {}
        before, after = r.get("parent_val_loss"), r.get("merged_val_loss")
        change = f"{100.0 * (after - before) / before:+.1f} %" if before and after is not None else "—"
        rows.append({"parent": parent, "parent_val_loss": _fmt(before), "merged_val_loss": _fmt(after),
                     "change": change})
    return rows


def _file_url(name: str, repo_id: str | None, revision: str | None, subfolder: str | None) -> str:
    """Where a card's image lives: relative in a local folder, the Hub's resolve URL once the repo is known."""
    if not repo_id:
        return name
    path = f"{subfolder.strip('/')}/{name}" if subfolder else name
    return f"{constants.ENDPOINT}/{repo_id}/resolve/{quote(revision or 'main', safe='')}/{path}"


def node_card_context(output_dir: str | os.PathLike, node: str, repo_id: str | None = None,
                      subfolder: str | None = None, revision: str | None = None) -> dict:
    """Everything the adapter card template needs, read from the node folder, its metrics and the run's dag.json.

    `repo_id`/`subfolder`/`revision` say where the card will live on the Hub (usage snippet, image URL); without a
    repo id the snippet shows `<user>/<repo>` with the node's subfolder, as `push_curriculum` lays it out.
    """
    output_dir = Path(output_dir)
    dag = _read_json(output_dir / "dag.json")
    node_dir = _node_dir(output_dir, dag, node)
    adapter_config = _read_json(node_dir / "adapter_config.json")
    if not adapter_config:
        raise FileNotFoundError(f"No adapter_config.json in {node_dir}: node {node!r} has no saved adapter yet.")
    metrics = _read_json(node_dir / "metrics.json")
    lineage_node = node if node in (dag.get("nodes") or {}) else metrics.get("node", node)
    entry = (dag.get("nodes") or {}).get(lineage_node) or {}
    gwm_config = adapter_config.get("gwm_config") or {}
    base = gwm_config.get("base_model_name_or_path") or dag.get("base")
    base_model, base_expr = _base_names(base)
    parents = entry.get("parents") or []
    merge = entry.get("merge") or {}
    fields = adapter_config.get("fields") or [{"name": n} for n in metrics.get("fields") or []]
    source_lines, datasets = _sources(metrics)

    settings = {
        "steps": metrics.get("steps"),
        "loops per block (n_loops)": adapter_config.get("n_loops", metrics.get("n_loops")),
        "canvas width (d_model)": adapter_config.get("d_model", gwm_config.get("d_model")),
        "context length (time steps)": gwm_config.get("context_len"),
        "forecast horizon (time steps)": gwm_config.get("horizon"),
        "backbone": gwm_config.get("backbone"),
        "frozen blocks x width": f"{adapter_config.get('num_blocks')} x {adapter_config.get('inner_dim')}",
        "trained block copies": adapter_config.get("train_blocks"),
        "seed": gwm_config.get("seed", dag.get("seed")),
        "wall time (s)": metrics.get("wall_time_s"),
        **(metrics.get("settings") or {}),
    }
    results = [
        ("train loss (first → last step)", metrics.get("train_loss_start"), metrics.get("train_loss_end")),
        ("validation loss (before → after training)", metrics.get("val_loss_start"), metrics.get("val_loss_end")),
    ]
    budget = budget_rows(node_dir, gwm_config)
    if not repo_id:
        subfolder = node
    card_data = ModelCardData(
        base_model=base_model,
        library_name="peft",
        pipeline_tag=PIPELINE_TAG,
        tags=[*CARD_TAGS, f"gwm-node:{node}"],
        datasets=datasets or None,
        license=DEFAULT_LICENSE,
        model_name=f"GWM adapter: {node}",
    )
    return {
        "card_data": card_data,
        "node": node,
        "repo_id": repo_id,
        "kind": "join" if len(parents) > 1 else "fork" if parents else "root",
        "parents": parents,
        "merge_method": merge.get("method") or ("linear" if len(parents) > 1 else None),
        "merge_weights": {p: _fmt(w, 3) for p, w in _parent_weights(entry).items()},
        "merge_extra": {k: v for k, v in merge.items() if k not in ("method", "weights")},
        "lineage": lineage_mermaid(dag, lineage_node) if entry else lineage_mermaid(
            {"nodes": {node: {}}}, node),
        "fields": [{"slot": i, "name": f.get("name", "?"), "unit": f.get("unit") or "—",
                    "transform": f.get("transform") or "none", "mean": _fmt(f.get("mean")), "std": _fmt(f.get("std"))}
                   for i, f in enumerate(fields)],
        "field_names": [f.get("name", "?") for f in fields],
        "sources": source_lines,
        "date_range": _date_range(metrics),
        "settings": {k: _fmt(v) for k, v in settings.items() if v is not None and v != "None x None"},
        "results": [{"metric": m, "start": _fmt(a), "end": _fmt(b)} for m, a, b in results if a is not None or
                    b is not None],
        "retention": _retention_rows(entry),
        "budget": budget,
        "budget_has_frozen": any(r["trainable"] == "no" for r in budget),
        "trainable_total": next(r["params"] for r in budget if "Total" in r["component"]).strip("*"),
        "subfolder": subfolder,
        "revision": revision if revision and revision != "main" else None,
        "plot_url": _file_url("loss_curve.png", repo_id, revision, subfolder),
        "base": base or "THUDM/CogVideoX-2b",
        "base_model": base_model,
        "base_expr": base_expr,
        "base_is_tiny": base_expr == "TINY_BASE_PATH",
        "base_is_hub": _is_hub_id(base),
        "has_plot": bool(metrics.get("history") or metrics.get("val_history")),
        "horizon": gwm_config.get("horizon"),
        "context_len": gwm_config.get("context_len"),
    }


def _tidy(card: ModelCard) -> ModelCard:
    """Collapse the blank lines that optional template sections leave behind."""
    return ModelCard(re.sub(r"\n{3,}", "\n\n", str(card)).rstrip() + "\n")


def render_node_card(output_dir: str | os.PathLike, node: str, repo_id: str | None = None,
                     subfolder: str | None = None, revision: str | None = None) -> ModelCard:
    """The model card of one node, from `hub_cards/adapter_card.md` (see `node_card_context` for the arguments)."""
    context = node_card_context(output_dir, node, repo_id=repo_id, subfolder=subfolder, revision=revision)
    card_data = context.pop("card_data")
    return _tidy(ModelCard.from_template(card_data, template_path=str(ADAPTER_CARD_TEMPLATE), **context))


def render_curriculum_card(output_dir: str | os.PathLike, repo_id: str | None = None,
                           revision: str | None = None) -> ModelCard:
    """The run-level index card (repo root): every node, its lineage and metrics, and how to load each one."""
    output_dir = Path(output_dir)
    dag = _read_json(output_dir / "dag.json")
    nodes = dag.get("nodes") or {}
    rows, datasets = [], []
    base = dag.get("base")
    for name in dict.fromkeys([*(dag.get("order") or []), *nodes]):
        entry = nodes.get(name) or {}
        node_dir = _node_dir(output_dir, dag, name)
        metrics = _read_json(node_dir / "metrics.json")
        config = _read_json(node_dir / "adapter_config.json")
        base = base or (config.get("gwm_config") or {}).get("base_model_name_or_path")
        datasets += _sources(metrics)[1]
        weights = _parent_weights(entry)
        rows.append({
            "name": name,
            "status": entry.get("status") or ("done" if config else "pending"),
            "published": bool(config) and (node_dir / "adapter_model.safetensors").is_file(),
            "parents": ", ".join(f"{p} ({_fmt(w, 3)})" if len(weights) > 1 else p for p, w in weights.items())
            or "—",
            "steps": _fmt(metrics.get("steps")),
            "val_loss": _fmt(metrics.get("val_loss_end")),
            "n_fields": len(config.get("fields") or metrics.get("fields") or []),
        })
    has_final = (output_dir / FINAL_NODE / "adapter_config.json").is_file()
    base_model, base_expr = _base_names(base)
    card_data = ModelCardData(base_model=base_model, library_name="peft", pipeline_tag=PIPELINE_TAG,
                              tags=list(CARD_TAGS), datasets=sorted(set(datasets)) or None, license=DEFAULT_LICENSE,
                              model_name="GWM curriculum")
    published = [r for r in rows if r["published"]]
    example = FINAL_NODE if has_final else (published[-1]["name"] if published else "<node>")
    return _tidy(ModelCard.from_template(
        card_data, template_path=str(CURRICULUM_CARD_TEMPLATE), repo_id=repo_id, nodes=rows,
        lineage=lineage_mermaid(dag), has_final=has_final, example_node=example, base_expr=base_expr,
        base_is_tiny=base_expr == "TINY_BASE_PATH", seed=dag.get("seed"),
        has_plot=any(r["steps"] != "—" for r in rows), plot_url=_file_url("loss_curves.png", repo_id, revision, None),
        revision=revision if revision and revision != "main" else None,
    ))


def write_node_card(output_dir: str, node_name: str) -> None:
    """Write `<output_dir>/<node>/README.md` and `loss_curve.png` (called by the trainer at the end of each node).

    Also refreshes the run's index card and all-nodes plot (`<output_dir>/README.md`, `loss_curves.png`).
    """
    output_dir_path = Path(output_dir)
    dag = _read_json(output_dir_path / "dag.json")
    node_dir = _node_dir(output_dir_path, dag, node_name)
    card = render_node_card(output_dir_path, node_name)
    card.save(node_dir / "README.md")
    plot_node_loss(_read_json(node_dir / "metrics.json"), node_dir / "loss_curve.png", title=node_name)
    if dag:
        render_curriculum_card(output_dir_path).save(output_dir_path / "README.md")
        plot_loss_curves(output_dir_path, output_dir_path / "loss_curves.png")
    logger.info("Wrote the model card and loss plot of node %r to %s", node_name, node_dir)


# ---------------------------------------------------------------------------------------------------- upload plans
def _published_nodes(output_dir: Path, dag: dict) -> list[tuple[str, Path]]:
    """(name in the repo, local folder) of every node whose adapter files are on disk, plus `final/`."""
    names = list(dict.fromkeys([*(dag.get("order") or []), *(dag.get("nodes") or {})]))
    found = []
    for name in [*names, FINAL_NODE]:
        folder = _node_dir(output_dir, dag, name)
        if all((folder / f).is_file() for f in ADAPTER_FILES):
            found.append((name, folder))
        elif name != FINAL_NODE:
            logger.info("Node %r has no saved adapter in %s: not uploaded.", name, folder)
    return found


def plan_node_upload(output_dir: str | os.PathLike, node: str, folder: str | os.PathLike | None = None,
                     path_in_repo: str | None = None, repo_id: str | None = None,
                     revision: str | None = None) -> list[CommitOperationAdd]:
    """The files of one node that go up: the allow-listed ones, with the card re-rendered for `repo_id`."""
    output_dir = Path(output_dir)
    folder = Path(folder) if folder is not None else _node_dir(output_dir, _read_json(output_dir / "dag.json"), node)
    prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
    operations = []
    for name in NODE_FILES:
        if name == "README.md" and (folder / "adapter_config.json").is_file():
            card = render_node_card(output_dir, node, repo_id=repo_id, subfolder=path_in_repo, revision=revision)
            operations.append(CommitOperationAdd(f"{prefix}README.md", str(card).encode("utf-8")))
        elif (folder / name).is_file():
            operations.append(CommitOperationAdd(f"{prefix}{name}", str(folder / name)))
    return operations


def plan_curriculum_upload(output_dir: str | os.PathLike, repo_id: str | None = None,
                           revision: str | None = None) -> list[CommitOperationAdd]:
    """Every file a curriculum push uploads, as `huggingface_hub.CommitOperationAdd`s (nothing is written).

    Repo root: README.md (index card), dag.json, loss_curves.png. One subfolder per node with saved adapter files
    (and `final/`): the files in `NODE_FILES`, cards re-rendered so their usage snippet names `repo_id`.
    """
    output_dir = Path(output_dir)
    dag = _read_json(output_dir / "dag.json")
    if not dag:
        raise FileNotFoundError(f"No dag.json in {output_dir}: not the output folder of a GWM curriculum run.")
    nodes = _published_nodes(output_dir, dag)
    if not nodes:
        raise FileNotFoundError(f"No node of the run in {output_dir} has saved adapter files: nothing to push.")
    operations = [
        CommitOperationAdd("README.md", str(render_curriculum_card(output_dir, repo_id, revision)).encode("utf-8")),
        CommitOperationAdd("dag.json", str(output_dir / "dag.json")),
    ]
    plot = io.BytesIO()
    plot_loss_curves(output_dir, plot)
    operations.append(CommitOperationAdd("loss_curves.png", plot.getvalue()))
    for name, folder in nodes:
        operations += plan_node_upload(output_dir, name, folder=folder, path_in_repo=name, repo_id=repo_id,
                                       revision=revision)
    return operations


# ---------------------------------------------------------------------------------------------------- loading
def download_adapter(repo_id: str, subfolder: str | None = None, revision: str | None = None,
                     token: str | bool | None = None) -> str:
    """The local folder of a GWM adapter on the Hub, through huggingface_hub's download and cache.

    Fetches `adapter_config.json` and `adapter_model.safetensors` (from `subfolder`, a curriculum node) into the
    Hugging Face cache, or finds them there when offline, and returns the folder holding them, ready for
    `GWMModel.from_pretrained(base, folder)`. Raises one clear error when offline and not cached, or when the repo,
    revision or node does not exist.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = repo_id + (f" (subfolder {subfolder})" if subfolder else "")
    where += f" at revision {revision}" if revision else ""
    paths = []
    for name in ADAPTER_FILES:
        try:
            paths.append(hf_hub_download(repo_id, name, subfolder=subfolder, revision=revision, token=token))
        except LocalEntryNotFoundError:
            reason = "HF_HUB_OFFLINE is set" if _is_offline() else "the Hub cannot be reached"
            raise HubOfflineError(
                f"The adapter {where} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {reason}: "
                "load it once with network access, or pass a local adapter folder."
            ) from None
        except RevisionNotFoundError:
            raise FileNotFoundError(f"The Hub repo {repo_id} has no revision {revision!r}.") from None
        except RepositoryNotFoundError:
            raise FileNotFoundError(f"No Hub model repo {repo_id} (or it is private and no token was given).") from None
        except EntryNotFoundError:
            raise FileNotFoundError(
                f"{where} has no {name}: not a GWM adapter. A curriculum repo keeps one node per subfolder: pass "
                "subfolder=<node> (its README lists the nodes)."
            ) from None
    return os.path.dirname(paths[0])


# ---------------------------------------------------------------------------------------------------- pushing
def _operation_bytes(operation: CommitOperationAdd) -> bytes:
    source = operation.path_or_fileobj
    if isinstance(source, bytes):
        return source
    if isinstance(source, (str, Path)):
        return Path(source).read_bytes()
    return b""


def _offline_message(reason: str, local_dir: str | os.PathLike | None, repo_id: str) -> str:
    if local_dir is None:
        return (f"Cannot push to the Hugging Face Hub: offline ({reason}); nothing was changed. Save the adapter with "
                f"`save_pretrained` and push it later with `push_adapter(folder, {repo_id!r})`.")
    return (f"Cannot push to the Hugging Face Hub: offline ({reason}); the local files in {local_dir} are "
            f"untouched; push later with `gwm push {local_dir} --hub_model_id {repo_id}`.")


def _is_offline() -> bool:
    """huggingface_hub reads HF_HUB_OFFLINE at import; honour it when it was set later too."""
    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the Hub cannot be reached', whichever HTTP client this huggingface_hub uses."""
    import importlib

    errors: list[type[BaseException]] = [OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx", "requests"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        errors.append(getattr(module, "TransportError", None) or module.ConnectionError)
    return tuple(errors)


def _commit(operations: list[CommitOperationAdd], repo_id: str, *, local_dir: str | os.PathLike | None,
            token: str | None, private: bool | None, revision: str | None, commit_message: str) -> str:
    """create_repo + (create_branch) + create_commit, with one clear message when the Hub cannot be reached."""
    if isinstance(token, str) and token:
        for operation in operations:
            if token.encode("utf-8") in _operation_bytes(operation):
                raise ValueError(f"Refusing to upload {operation.path_in_repo}: it contains the Hub token.")
    if _is_offline():
        raise HubOfflineError(_offline_message("HF_HUB_OFFLINE is set", local_dir, repo_id))
    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations=operations, commit_message=commit_message, revision=revision)
    except _network_errors() as err:
        raise HubOfflineError(_offline_message(f"no network: {type(err).__name__}", local_dir, repo_id)) from None
    logger.info("Pushed %d files to %s: %s", len(operations), repo_id, info.commit_url)
    return info.commit_url


def push_curriculum(output_dir: str, repo_id: str, token: str | None = None, private: bool | None = None,
                    revision: str | None = None) -> str:
    """Publish a whole run to one Hub repo, one subfolder per node (see the module docstring). Returns the commit URL.

    Load a node back with `GWMModel.from_pretrained(base, repo_id, subfolder=node)`.
    """
    operations = plan_curriculum_upload(output_dir, repo_id=repo_id, revision=revision)
    nodes = sorted({op.path_in_repo.split("/")[0] for op in operations if "/" in op.path_in_repo})
    return _commit(operations, repo_id, local_dir=output_dir, token=token, private=private, revision=revision,
                   commit_message=f"Upload GWM curriculum ({len(nodes)} nodes: {', '.join(nodes)})")


def push_adapter(model_or_folder, repo_id: str, *, adapter_name: str | None = None, subfolder: str | None = None,
                 private: bool | None = None, token: str | None = None, revision: str | None = None) -> str:
    """Push one adapter with its GWM card: a `PeftModel` (its `adapter_name`, default the active one) or a node folder.

    Use this rather than `PeftModel.push_to_hub`, which replaces the card with a generic transformers one. A node
    folder inside a run keeps its lineage and metrics; a bare model gets a card from its adapter config alone.
    `subfolder` puts the files under that folder of the repo. Returns the commit URL.
    """
    with tempfile.TemporaryDirectory() as staging:
        if isinstance(model_or_folder, (str, os.PathLike)):
            source, local_dir = Path(model_or_folder), str(model_or_folder)
            if not all((source / f).is_file() for f in ADAPTER_FILES):
                raise FileNotFoundError(f"{source} is not an adapter folder (needs {' + '.join(ADAPTER_FILES)}).")
            node = source.name
        else:
            name, local_dir = adapter_name or model_or_folder.active_adapter, None
            model_or_folder.save_pretrained(Path(staging, "saved"), selected_adapters=[name])
            source = Path(staging, "saved", name if name != "default" else "")  # PEFT's layout for named adapters
            node = name if name != "default" else repo_id.split("/")[-1]
        if local_dir is not None and (source.parent / "dag.json").is_file():
            run_dir = source.parent  # a node of a run: its card keeps lineage and metrics
        else:
            run_dir = Path(staging, "run")
            (run_dir / node).mkdir(parents=True)
            for name in NODE_FILES:
                if name != "README.md" and (source / name).is_file():
                    shutil.copy2(source / name, run_dir / node / name)
        operations = plan_node_upload(run_dir, node, path_in_repo=subfolder, repo_id=repo_id, revision=revision)
        return _commit(operations, repo_id, local_dir=local_dir, token=token, private=private, revision=revision,
                       commit_message=f"Upload GWM adapter {node}")


__all__ = [
    "HubOfflineError",
    "download_adapter",
    "lineage_mermaid",
    "plan_curriculum_upload",
    "plan_node_upload",
    "plot_loss_curves",
    "plot_node_loss",
    "push_adapter",
    "push_curriculum",
    "render_curriculum_card",
    "render_node_card",
    "write_node_card",
]
