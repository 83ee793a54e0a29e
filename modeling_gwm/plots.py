"""Every matplotlib figure GWM draws, rendered to a PNG file or buffer without a display (`matplotlib.figure.Figure`,
no pyplot state).
"""

from __future__ import annotations

import io
import os
import textwrap

import numpy as np
import pandas as pd


def plot_forecast(history: pd.DataFrame, predictions: pd.DataFrame, path: str | os.PathLike | io.BytesIO,
                  actuals: pd.DataFrame | None = None, units: dict[str, str | None] | None = None,
                  title: str | None = None, context: int | None = None, quantiles: pd.DataFrame | None = None,
                  ) -> None:
    """One subplot per field: the recent history, the forecast and (when given) the held-out actuals, as a PNG.

    `quantiles` (a `forecast_quantiles` frame) adds the 10-90 % band around the forecast where it has those levels.
    """
    from matplotlib.figure import Figure

    units = units or predictions.attrs.get("units") or {}
    names = list(predictions.columns)
    context = context or max(4 * len(predictions), 48)
    recent = history.iloc[-context:]
    fig = Figure(figsize=(9, 2.4 * len(names) + 0.8), dpi=110)
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, names):
        observed = recent[name].dropna()
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
        ax.plot(*_joined(anchor, predictions[name]), color="#d62728", lw=1.8, marker="o", ms=3,
                label="GWM forecast")
        ax.axvspan(predictions.index[0], predictions.index[-1], color="#d62728", alpha=0.05, lw=0)
        ax.set_title(name, fontsize=10, loc="left")
        ax.set_ylabel(textwrap.fill(units.get(name) or "value", 28), fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(title or f"GWM forecast, {len(predictions)} steps", fontsize=11, x=0.01, ha="left")
    if isinstance(predictions.index, pd.DatetimeIndex):
        fig.autofmt_xdate()
    fig.tight_layout(rect=(0, 0, 1, 0.97 if len(names) > 1 else 0.95))
    fig.savefig(path, format="png")


def _joined(anchor: pd.Series, series: pd.Series) -> tuple[pd.Index, np.ndarray]:
    joined = pd.concat([anchor, series]) if len(anchor) and anchor.index[-1] < series.index[0] else series
    return joined.index, joined.to_numpy(dtype=np.float64)


__all__ = ["plot_forecast"]
