"""Model cards of a GWM run: one per node (lineage, data, settings, results, parameter budget, usage) and the run's
index card. This module reads a run folder into each card's context; `hub_cards` (the top-level package holding the
templates) renders it with huggingface_hub's `ModelCard`.

The trainer writes them next to the adapters (`write_node_card`); a Hub push re-renders them for the target repo.
"""

from __future__ import annotations

import json
import logging
import os
import re
from urllib.parse import quote

from huggingface_hub import ModelCard, ModelCardData, constants

from hub_cards import (
    ADAPTER_CARD_TEMPLATE,
    CURRICULUM_CARD_TEMPLATE,
    format_value,
    lineage_mermaid,
    parent_weights,
    render_card,
)

from ..model.budget import budget_rows
from ..plots import plot_loss_curves, plot_node_loss
from ..run_folder import (
    ADAPTER_CONFIG_FILE,
    CARD_FILE,
    FINAL_NODE,
    LOSS_CURVE_FILE,
    LOSS_CURVES_FILE,
    METRICS_FILE,
    RunFolder,
)
from ..tabular import is_coarser

logger = logging.getLogger(__name__)

CARD_TAGS = ["gwm", "world-model", "cogvideox", "peft", "time-series"]
PIPELINE_TAG = "time-series-forecasting"
DEFAULT_LICENSE = "apache-2.0"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and bool(_HUB_ID.match(str(name))) and not os.path.exists(str(name))


def _is_tiny_base(base: str) -> bool:
    """A local folder holding the tiny CogVideoX-architecture base (the shipped one, or one `gwm make-tiny-base`
    wrote): its transformer config has the tiny architecture."""
    from ..model.base import TINY_ARCHITECTURE

    try:
        with open(os.path.join(base, "transformer", "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and all(config.get(k) == v for k, v in TINY_ARCHITECTURE.items())


def _hub_base_model(base: str | None) -> str | None:
    """The card's `base_model` metadata: a Hub id, or None (left out) for a local base, which the Hub cannot link."""
    return "THUDM/CogVideoX-2b" if not base else base if _is_hub_id(base) else None


def _base_names(base: str | None) -> tuple[str, str]:
    """(`base_model` metadata, Python expression for the usage snippet) for a base name or path. The tiny base is
    `base`, which the snippet writes with `make_tiny_cogvideox` first: a local path would not exist for the reader."""
    if not base:
        return "THUDM/CogVideoX-2b", '"THUDM/CogVideoX-2b"'
    if os.path.isdir(base) and _is_tiny_base(base):
        return "tiny-cogvideox", "base"
    if _is_hub_id(base):
        return base, json.dumps(base)
    return os.path.basename(os.path.normpath(base)), json.dumps(base)


# ---------------------------------------------------------------------------------------------------- node card
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
        before, after = (r.get("parent_val_loss"), r.get("merged_val_loss")) if isinstance(r, dict) else (None, None)
        if before is None and after is None:  # nothing recorded: no row (and without rows, no heading)
            continue
        change = f"{100.0 * (after - before) / before:+.1f} %" if before and after is not None else "—"
        rows.append({"parent": parent, "parent_val_loss": format_value(before), "merged_val_loss": format_value(after),
                     "change": change})
    return rows


def _file_url(name: str, repo_id: str | None, revision: str | None, subfolder: str | None) -> str:
    """Where a card's image lives: relative in a local folder, the Hub's resolve URL once the repo is known."""
    if not repo_id:
        return name
    path = f"{subfolder.strip('/')}/{name}" if subfolder else name
    return f"{constants.ENDPOINT}/{repo_id}/resolve/{quote(revision or 'main', safe='')}/{path}"


def _lineage_context(dag: dict, node: str, lineage_node: str, entry: dict) -> dict:
    """Where the node sits in the DAG: kind, parents, merge recipe and retention, the mermaid lineage."""
    parents = entry.get("parents") or []
    merge = entry.get("merge") or {}
    return {
        "kind": "join" if len(parents) > 1 else "fork" if parents else "root",
        "parents": parents,
        "merge_method": merge.get("method") or ("linear" if len(parents) > 1 else None),
        "merge_weights": {p: format_value(w, 3) for p, w in parent_weights(entry).items()},
        "merge_extra": {k: v for k, v in merge.items() if k not in ("method", "weights")},
        "lineage": lineage_mermaid(dag, lineage_node) if entry else lineage_mermaid(
            {"nodes": {node: {}}}, node),
        "retention": _retention_rows(entry),
    }


def _training_context(adapter_config: dict, gwm_config: dict, metrics: dict, dag: dict) -> dict:
    """What the node was trained on and with: fields, the settings table and the loss results."""
    fields = adapter_config.get("fields") or [{"name": n} for n in metrics.get("fields") or []]
    trained = set(metrics.get("fields") or [f.get("name") for f in fields])  # the node's own data; the rest inherited
    settings = {
        "steps": metrics.get("steps"),
        "loops per block (n_loops)": adapter_config.get("n_loops", metrics.get("n_loops")),
        "canvas width (d_model)": adapter_config.get("d_model", gwm_config.get("d_model")),
        "context length (time steps)": gwm_config.get("context_len"),
        "forecast horizon (time steps)": gwm_config.get("horizon"),
        "backbone": gwm_config.get("backbone"),
        "frozen blocks x width": f"{adapter_config.get('num_blocks')} x {adapter_config.get('inner_dim')}",
        "trained block copies": adapter_config.get("train_blocks"),
        "adapter init seed (model.seed + --seed)": gwm_config.get("seed", dag.get("seed")),
        "wall time (s)": metrics.get("wall_time_s"),
        # the run's settings; context_len and horizon are in the rows above already
        **{k: v for k, v in (metrics.get("settings") or {}).items() if k not in ("context_len", "horizon")},
    }
    results = [
        ("train loss (first → last step)", metrics.get("train_loss_start"), metrics.get("train_loss_end")),
        ("validation loss (before training → last step)", metrics.get("val_loss_start"), metrics.get("val_loss_end")),
    ]
    if metrics.get("best_step") is not None:  # what this adapter is: the evaluated step with the lowest loss
        results.append((f"validation loss of this adapter (step {metrics['best_step']} of {metrics.get('steps')}, the "
                        "best evaluated)", None, metrics.get("val_loss_best")))
    calibration = metrics.get("quantile_calibration") or {}
    if calibration.get("coverage_10_90_after") is not None:  # the band this adapter forecasts with
        results.append(("held-out targets inside the 10–90 % band of this adapter (before → after its calibration on "
                        "the validation windows; 0.8 is calibrated)", calibration.get("coverage_10_90_before"),
                        calibration["coverage_10_90_after"]))
    elif metrics.get("val_coverage_10_90_end") is not None:
        results.append(("held-out targets inside the 10–90 % band, last evaluation (0.8 when calibrated)", None,
                        metrics["val_coverage_10_90_end"]))
    grid = next((f["frequency"] for f in fields if f.get("frequency")), None)
    return {
        "fields": [{"slot": i, "name": f.get("name", "?"), "unit": f.get("unit") or "—",
                    "transform": f.get("transform") or "none", "mean": format_value(f.get("mean")),
                    "std": format_value(f.get("std")),
                    "own_frequency": f.get("own_frequency") or f.get("frequency") or "—",
                    "inherited": f.get("name") not in trained}
                   for i, f in enumerate(fields)],
        "grid": grid,
        "coarser_fields": [f.get("name", "?") for f in fields if is_coarser(f.get("own_frequency"), grid)],
        "field_names": [f.get("name", "?") for f in fields if f.get("name") in trained],
        "has_inherited": any(f.get("name") not in trained for f in fields),
        "example_field": next((f.get("name") for f in fields if f.get("name") in trained), "<field>"),
        "settings": {k: format_value(v) for k, v in settings.items() if v is not None and v != "None x None"},
        "results": [{"metric": m, "start": format_value(a), "end": format_value(b)} for m, a, b in results
                    if a is not None or b is not None],
        "date_range": _date_range(metrics),
        "has_plot": bool(metrics.get("history") or metrics.get("val_history")),
        "horizon": gwm_config.get("horizon"),
        "context_len": gwm_config.get("context_len"),
    }


def _budget_context(budget: list[dict]) -> dict:
    return {
        "budget": budget,
        "budget_has_frozen": any(r["trainable"] == "no" for r in budget),
        "trainable_total": next(r["params"] for r in budget if "Total" in r["component"]).strip("*"),
    }


def _usage_context(base: str | None, repo_id: str | None, subfolder: str | None, revision: str | None) -> dict:
    """What the usage snippet and the loss-plot link need: the base to load and where the card lives."""
    base_model, base_expr = _base_names(base)
    return {
        "repo_id": repo_id,
        "subfolder": subfolder,
        "revision": revision if revision and revision != "main" else None,
        "plot_url": _file_url(LOSS_CURVE_FILE, repo_id, revision, subfolder),
        "base": base or "THUDM/CogVideoX-2b",
        "base_model": base_model,
        "base_expr": base_expr,
        "base_is_tiny": base_expr == "base",
        "base_is_hub": _is_hub_id(base),
    }


def node_card_context(output_dir: str | os.PathLike, node: str, repo_id: str | None = None,
                      subfolder: str | None = None, revision: str | None = None) -> dict:
    """Everything the adapter card template needs, read from the node folder, its metrics and the run's dag.json.

    `repo_id`/`subfolder`/`revision` say where the card will live on the Hub (usage snippet, image URL); without a
    repo id the snippet shows `<user>/<repo>` with the node's subfolder, as `push_curriculum` lays it out.
    """
    folder = RunFolder(output_dir)
    dag = folder.read_dag()
    adapter_config = folder.read_node_json_if_any(node, ADAPTER_CONFIG_FILE)
    if not adapter_config:
        raise FileNotFoundError(
            f"No {ADAPTER_CONFIG_FILE} in {folder.node_dir(node)}: node {node!r} has no saved adapter yet.")
    metrics = folder.read_node_json_if_any(node, METRICS_FILE)
    lineage_node = node if node in (dag.get("nodes") or {}) else metrics.get("node", node)
    entry = (dag.get("nodes") or {}).get(lineage_node) or {}
    gwm_config = adapter_config.get("gwm_config") or {}
    source_lines, datasets = _sources(metrics)
    context = {
        "node": node,
        "sources": source_lines,
        **_lineage_context(dag, node, lineage_node, entry),
        **_training_context(adapter_config, gwm_config, metrics, dag),
        **_budget_context(budget_rows(folder.node_dir(node), gwm_config)),
        **_usage_context(gwm_config.get("base_model_name_or_path") or dag.get("base"), repo_id,
                         subfolder if repo_id else node, revision),
    }
    context["card_data"] = ModelCardData(
        base_model=_hub_base_model(gwm_config.get("base_model_name_or_path") or dag.get("base")),
        library_name="peft",
        pipeline_tag=PIPELINE_TAG,
        tags=[*CARD_TAGS, f"gwm-node:{node}"],
        datasets=datasets or None,
        license=DEFAULT_LICENSE,
        model_name=f"GWM adapter: {node}",
    )
    return context


# ---------------------------------------------------------------------------------------------------- rendering
def render_node_card(output_dir: str | os.PathLike, node: str, repo_id: str | None = None,
                     subfolder: str | None = None, revision: str | None = None) -> ModelCard:
    """The model card of one node, from `hub_cards`' template `adapter_card.md` (see `node_card_context`)."""
    context = node_card_context(output_dir, node, repo_id=repo_id, subfolder=subfolder, revision=revision)
    return render_card(ADAPTER_CARD_TEMPLATE, context.pop("card_data"), **context)


def _curriculum_row(folder: RunFolder, name: str, entry: dict, metrics: dict, config: dict) -> dict:
    """One node's line in the index card: status, whether its adapter is published, parents, steps, loss."""
    weights = parent_weights(entry)
    return {
        "name": name,
        "status": entry.get("status") or ("done" if config else "pending"),
        "published": bool(config) and folder.has_adapter(name),
        "parents": ", ".join(f"{p} ({format_value(w, 3)})" if len(weights) > 1 else p
                             for p, w in weights.items()) or "—",
        "steps": format_value(metrics.get("steps")),
        "val_loss": format_value(metrics.get("val_loss_best", metrics.get("val_loss_end"))),  # the adapter written
        "n_fields": len(config.get("fields") or metrics.get("fields") or []),
        "grid": next((f["frequency"] for f in config.get("fields") or [] if isinstance(f, dict) and f.get("frequency")),
                     "—"),
    }


def render_curriculum_card(output_dir: str | os.PathLike, repo_id: str | None = None,
                           revision: str | None = None) -> ModelCard:
    """The run-level index card (repo root): every node, its lineage and metrics, and how to load each one."""
    folder = RunFolder(output_dir)
    dag = folder.read_dag()
    nodes = dag.get("nodes") or {}
    rows, datasets = [], []
    base = dag.get("base")
    for name in RunFolder.node_names(dag):
        metrics = folder.read_node_json_if_any(name, METRICS_FILE)
        config = folder.read_node_json_if_any(name, ADAPTER_CONFIG_FILE)
        base = base or (config.get("gwm_config") or {}).get("base_model_name_or_path")
        datasets += _sources(metrics)[1]
        rows.append(_curriculum_row(folder, name, nodes.get(name) or {}, metrics, config))
    has_final = (folder.node_dir(FINAL_NODE) / ADAPTER_CONFIG_FILE).is_file()
    _, base_expr = _base_names(base)
    card_data = ModelCardData(base_model=_hub_base_model(base), library_name="peft", pipeline_tag=PIPELINE_TAG,
                              tags=list(CARD_TAGS), datasets=sorted(set(datasets)) or None, license=DEFAULT_LICENSE,
                              model_name="GWM curriculum")
    published = [r for r in rows if r["published"]]
    example = FINAL_NODE if has_final else (published[-1]["name"] if published else "<node>")
    return render_card(
        CURRICULUM_CARD_TEMPLATE, card_data, repo_id=repo_id, nodes=rows,
        lineage=lineage_mermaid(dag), has_final=has_final, example_node=example, base_expr=base_expr,
        base_is_tiny=base_expr == "base", seed=dag.get("seed"),
        has_plot=any(r["steps"] != "—" for r in rows), plot_url=_file_url(LOSS_CURVES_FILE, repo_id, revision, None),
        revision=revision if revision and revision != "main" else None,
    )


def write_node_card(output_dir: str, node_name: str) -> None:
    """Write `<output_dir>/<node>/README.md` and `loss_curve.png` (called by the trainer at the end of each node).

    Also refreshes the run's index card and all-nodes plot (`<output_dir>/README.md`, `loss_curves.png`).
    """
    folder = RunFolder(output_dir)
    dag = folder.read_dag()
    node_dir = folder.node_dir(node_name)
    render_node_card(folder.path, node_name).save(node_dir / CARD_FILE)
    plot_node_loss(folder.read_node_json_if_any(node_name, METRICS_FILE), node_dir / LOSS_CURVE_FILE,
                   title=node_name)
    if dag:
        render_curriculum_card(folder.path).save(folder.path / CARD_FILE)
        plot_loss_curves(folder.path, folder.path / LOSS_CURVES_FILE)
    logger.info("Wrote the model card and loss plot of node %r to %s", node_name, node_dir)


__all__ = ["node_card_context", "render_curriculum_card", "render_node_card", "write_node_card"]
