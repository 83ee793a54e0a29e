"""Every matplotlib figure GWM draws, as PNG files or buffers (no pyplot: no global backend state, safe in any process).

Loss curves: one node's training and validation loss (`plot_node_loss`), and a whole run's nodes laid end to end
(`plot_loss_curves`). Forecasts: the recent history, the forecast with its 10-90 % band and held-out actuals
(`plot_forecast`).
"""

from __future__ import annotations

import io
import os
import textwrap

import numpy as np
import pandas as pd

from .run_folder import METRICS_FILE, RunFolder


def _history(metrics: dict, where: str) -> tuple[list, list, list, list]:
    """(train steps, train losses, val steps, val losses) of a metrics.json; wrong types are a ValueError naming it."""
    out = []
    for key, loss in (("history", "train_loss"), ("val_history", "val_loss")):
        entries = metrics.get(key) or []
        if not isinstance(entries, list) or not all(isinstance(h, dict) for h in entries):
            raise ValueError(f"{where}: {key} must be a list of {{step, {loss}}} objects; restore or delete the file")
        pairs = [(h.get("step"), h.get(loss)) for h in entries]
        pairs = [(s, v) for s, v in pairs if s is not None and v is not None]
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for pair in pairs for x in pair):
            raise ValueError(f"{where}: {key} holds a step or {loss} that is not a number; restore or delete the file")
        out += [[s for s, _ in pairs], [v for _, v in pairs]]
    return out[0], out[1], out[2], out[3]


def _ema(values: list[float], span: int) -> list[float]:
    alpha, out, acc = 2.0 / (span + 1), [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def _finish_axes(ax, values: list[float], legend_outside: bool = False) -> None:
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    ax.set_ylabel("pinball loss (window-scaled units)")
    ax.grid(True, alpha=0.3)
    if not ax.get_legend_handles_labels()[0]:
        return
    if legend_outside:  # many curves: the legend right of the axes, never over them
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8, frameon=False)
    else:
        ax.legend(loc="best", framealpha=0.8)


def plot_node_loss(metrics: dict, path: str | os.PathLike | io.BytesIO, title: str | None = None) -> None:
    """One node's training loss (raw and smoothed) and validation loss against step, the written (best) step starred,
    as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, safe in any process

    node = title or metrics.get("node") or "node"
    steps, train, vsteps, val = _history(metrics, f"metrics of node {node!r}")
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
    if metrics.get("best_step") is not None and metrics.get("val_loss_best") is not None:
        ax.plot([metrics["best_step"]], [metrics["val_loss_best"]], color="tab:red", marker="*", ms=14, ls="none",
                label=f"written: best step {metrics['best_step']}")
    if not train and not val:
        ax.text(0.5, 0.5, "no loss history recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"GWM node '{node}': loss")
    ax.set_xlabel("optimiser step")
    _finish_axes(ax, train + val)
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_loss_curves(output_dir: str | os.PathLike, path: str | os.PathLike | io.BytesIO) -> None:
    """Every trained node of a run on one axis, in training order (steps laid end to end), as a PNG."""
    loss_curves_figure(output_dir).savefig(path, format="png")


def loss_curves_figure(output_dir: str | os.PathLike):
    """The matplotlib Figure `plot_loss_curves` saves: one axis, its legend to the right of it."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    folder = RunFolder(output_dir)
    names = RunFolder.node_names(folder.read_dag())
    fig = Figure(figsize=(10.5, 4.5), dpi=110)
    ax = fig.subplots()
    offset, all_values, colors = 0, [], colormaps["tab10"]
    for i, name in enumerate(names):
        steps, train, vsteps, val = _history(folder.read_node_json_if_any(name, METRICS_FILE),
                                             str(folder.node_dir(name) / METRICS_FILE))
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
    _finish_axes(ax, all_values, legend_outside=True)
    fig.tight_layout()
    return fig


BASELINE_COLOURS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")


def plot_forecast(history: pd.DataFrame, predictions: pd.DataFrame, path: str | os.PathLike | io.BytesIO,
                  actuals: pd.DataFrame | None = None, units: dict[str, str | None] | None = None,
                  title: str | None = None, context: int | None = None, quantiles: pd.DataFrame | None = None,
                  baselines: dict[str, pd.DataFrame] | None = None) -> None:
    """One subplot per field: the recent history, the forecast and (when given) the held-out actuals, as a PNG.

    `quantiles` (a `forecast_quantiles` frame) adds the 10-90 % band around the forecast where it has those levels;
    `baselines` ({method: frame like `predictions`}) draws each baseline's forecast next to the model's.
    """
    from matplotlib.figure import Figure

    units = units or predictions.attrs.get("units") or {}
    names = list(predictions.columns)
    context = context or max(4 * len(predictions), 48)  # history rows shown (of a coarser field: observations)
    recent = history.iloc[-context:]
    fig = Figure(figsize=(9, 2.4 * len(names) + 0.8), dpi=110)
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, names):
        observed = recent[name].dropna()
        if len(observed) < len(recent) / 2:  # sparse on the grid (a coarser field): its own last observations, joined
            observed = history[name].dropna().iloc[-context:]
            ax.plot(observed.index, observed, color="#444444", lw=1.3, marker=".", ms=3, label="history")
        else:
            ax.plot(recent.index, recent[name], color="#444444", lw=1.3, label="history")
        # start the forecast and the actuals at the last observed point, so the lines read as continuations
        anchor = observed.iloc[-1:]
        if actuals is not None and name in actuals:
            ax.plot(*_joined(anchor, actuals[name]), color="#1f77b4", lw=1.4, marker="s", ms=3, label="actual")
        band = [(name, q) for q in (0.1, 0.9)]
        if quantiles is not None and all(c in quantiles.columns for c in band):
            low, high = (quantiles[c].dropna() for c in band)
            ax.fill_between(low.index, low.to_numpy(dtype=np.float64), high.reindex(low.index).to_numpy(np.float64),
                            color="#d62728", alpha=0.18, lw=0, label="10-90 %")
        for i, (method, frame) in enumerate((baselines or {}).items()):
            if name in frame:
                ax.plot(*_joined(anchor, frame[name]), color=BASELINE_COLOURS[i % len(BASELINE_COLOURS)], lw=1.0,
                        ls="--", label=method)
        ax.plot(*_joined(anchor, predictions[name]), color="#d62728", lw=1.8, marker="o", ms=3,
                label="GWM forecast")
        ax.axvspan(predictions.index[0], predictions.index[-1], color="#d62728", alpha=0.05, lw=0)
        ax.set_title(name, fontsize=10, loc="left")
        ax.set_ylabel(textwrap.fill(units.get(name) or "value", 28), fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=min(len(labels), 5), fontsize=8, frameon=False)
    fig.suptitle(title or f"GWM forecast, {len(predictions)} steps", fontsize=11, x=0.01, ha="left")
    if isinstance(predictions.index, pd.DatetimeIndex):
        fig.autofmt_xdate()
    fig.tight_layout(rect=(0, 0, 1, 0.97 if len(names) > 1 else 0.95))
    fig.savefig(path, format="png")


def _joined(anchor: pd.Series, series: pd.Series) -> tuple[pd.Index, np.ndarray]:
    series = series.dropna()  # a coarser field's forecast is NaN between its own steps: draw one line through them
    joined = pd.concat([anchor, series]) if len(anchor) and len(series) and anchor.index[-1] < series.index[0] \
        else series
    return joined.index, joined.to_numpy(dtype=np.float64)


__all__ = ["loss_curves_figure", "plot_forecast", "plot_loss_curves", "plot_node_loss"]
