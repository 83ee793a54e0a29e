"""Score a GWM adapter on a held-out tail next to the baselines a forecaster would use, with MASE and WQL.

Baselines: last value (`naive`), the value one season earlier (`seasonal_naive`), and, with the optional
`statsforecast` extra (`pip install -e ".[eval]"`), `auto_ets`, `auto_arima` and `auto_theta`. With statsforecast,
every baseline is statsforecast's model (`Naive`, `SeasonalNaive`, `AutoETS`, ...) with its prediction intervals as
quantiles (the 80 % interval's ends are the 0.1 and 0.9 quantiles), so each gets a weighted quantile loss; without
it (the core install) the two naive baselines are computed here, as point forecasts only. Metrics, per field, in the
field's own units, computed by `utilsforecast.losses` over the steps where the field is observed:

- MAE, RMSE; MASE (`mase`): MAE over the in-sample MAE of the one-step seasonal-naive forecast (Hyndman & Koehler
  2006);
- WQL (`scaled_crps`): for each quantile level q, 2 * sum_t pinball_q(y_t, yhat_q,t) / sum_t |y_t|, averaged over the
  levels (the weighted quantile loss of the Chronos benchmark);
- the aggregate: for each method, the geometric mean over fields of its MASE (and WQL) divided by seasonal-naive's
  (naive's for a field without a season), the relative score of the Chronos and GIFT-Eval benchmarks.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
from utilsforecast import losses

from ..model.canvas import season_period
from ..model.configuration_gwm import DEFAULT_QUANTILE_LEVELS
from ..tabular import DataError, own_periods, own_spacing
from .pipeline import AdapterSpec, GWMPipeline, check_finite, check_steps, read_history

logger = logging.getLogger(__name__)

NAIVE_METHODS = ("naive", "seasonal_naive")
STATS_METHODS = ("auto_ets", "auto_arima", "auto_theta")  # need statsforecast
BASELINES = NAIVE_METHODS + STATS_METHODS
MISSING_STATSFORECAST = 'auto_ets, auto_arima and auto_theta need statsforecast: pip install -e ".[eval]"'
# AutoARIMA's seasonal search is polynomial in the season (a weekly season of 52 takes many minutes on one series):
# above this season it is fitted without seasonal terms
ARIMA_MAX_SEASON = 24
_NOT_JSON = ("predictions", "quantiles", "actuals", "history", "baseline_predictions")


# ---------------------------------------------------------------------------------------------------- baselines
def naive_forecast(train: np.ndarray, horizon: int) -> np.ndarray:
    """The last observed value, repeated (the `naive` baseline without statsforecast)."""
    observed = np.asarray(train, dtype=np.float64)
    observed = observed[~np.isnan(observed)]
    return np.full(horizon, observed[-1] if len(observed) else np.nan)


def seasonal_naive_forecast(train: np.ndarray, horizon: int, season: int) -> np.ndarray:
    """The value one season earlier: y_hat[T + h] = y[T + h - season * ceil(h / season)] (gaps forward-filled; the
    `seasonal_naive` baseline without statsforecast)."""
    filled = pd.Series(np.asarray(train, dtype=np.float64)).ffill().to_numpy()
    _check_one_season(len(filled), season)
    last_season = filled[-season:]
    return np.array([last_season[h % season] for h in range(horizon)])


def _check_one_season(length: int, season: int) -> None:
    if length < season:
        raise DataError(f"seasonal naive needs at least one season ({season} steps) of training data, got {length}")


def has_statsforecast() -> bool:
    try:
        import statsforecast  # noqa: F401
    except ImportError:
        return False
    return True


def _interval_columns(name: str, levels: tuple[float, ...]) -> tuple[list[float], list[str]]:
    """statsforecast's interval levels for quantile levels, and the column holding each quantile (in level order).

    A central interval of level L (%) ends at the quantiles (1 - L/100) / 2 and (1 + L/100) / 2: q0.1 is `lo-80`,
    q0.9 `hi-80`; q0.5 is the point forecast (the mean, which is the median of the symmetric intervals used here).
    """
    widths, columns = [], []
    for q in levels:
        width = round(abs(2 * q - 1) * 100, 6)
        width = int(width) if float(width).is_integer() else width
        if width == 0:
            columns.append(name)
            continue
        widths.append(width)
        columns.append(f"{name}-{'lo' if q < 0.5 else 'hi'}-{width}")
    return sorted(set(widths)), columns


def statistical_forecasts(observed: np.ndarray, horizon: int, season: int, methods: tuple[str, ...],
                          levels: tuple[float, ...] = DEFAULT_QUANTILE_LEVELS
                          ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fit statsforecast models to a gap-free series and forecast it, with quantiles.

    observed (N,) consecutive observations -> {method: (point (horizon,), quantiles (horizon, Q))}; a method that
    fails on this series (too short for its season, say) is left out with a warning; seasonal naive on less than
    one season is a DataError. AutoARIMA ignores a season longer than `ARIMA_MAX_SEASON` (weekly data) and fits a
    non-seasonal model.
    """
    if not has_statsforecast():
        raise ValueError(MISSING_STATSFORECAST)
    if "seasonal_naive" in methods:
        _check_one_season(len(observed), season)
    from statsforecast import StatsForecast
    from statsforecast.models import AutoARIMA, AutoETS, AutoTheta, Naive, SeasonalNaive

    build = {"naive": lambda: Naive(), "seasonal_naive": lambda: SeasonalNaive(season_length=season),
             "auto_ets": lambda: AutoETS(season_length=season),
             "auto_arima": lambda: AutoARIMA(season_length=season if season <= ARIMA_MAX_SEASON else 1),
             "auto_theta": lambda: AutoTheta(season_length=season)}
    frame = pd.DataFrame({"unique_id": "series", "ds": np.arange(len(observed)), "y": observed})
    out = {}
    for method in methods:
        model = build[method]()
        widths, columns = _interval_columns(str(model), levels)
        try:
            result = StatsForecast(models=[model], freq=1, n_jobs=1).forecast(df=frame, h=horizon, level=widths)
        except Exception as err:  # statsforecast raises many types on series it cannot fit
            logger.warning("%s could not be fitted (%s: %s): left out", method, type(err).__name__,
                           str(err).splitlines()[0] if str(err) else "")
            continue
        out[method] = (result[str(model)].to_numpy(np.float64), result[columns].to_numpy(np.float64))
    return out


# ---------------------------------------------------------------------------------------------------- metrics
def _long_frame(values: np.ndarray, **columns: np.ndarray) -> pd.DataFrame:
    """One series as utilsforecast takes it: unique_id, ds (the step), y = `values`, and `columns` alongside."""
    return pd.DataFrame({"unique_id": "series", "ds": np.arange(len(values)), "y": values, **columns})


def error_metrics(actual: np.ndarray, predicted: np.ndarray, train: np.ndarray, season: int = 1) -> dict[str, float]:
    """MAE, RMSE and MASE (`utilsforecast.losses`) over the steps where `actual` is observed.

    MASE divides the MAE by the in-sample MAE of the seasonal-naive one-step forecast (lag `season`, 1 = naive) on
    `train` (Hyndman & Koehler 2006; differences touching a gap in `train` are left out), so < 1 beats that baseline
    on average. NaN where utilsforecast would give inf or a score of nothing: a flat training series (no scale), no
    observed step, or a forecast missing at an observed step.
    """
    actual, predicted = np.asarray(actual, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    scored = ~np.isnan(actual)
    if not scored.any() or np.isnan(predicted[scored]).any():
        return {"mae": math.nan, "rmse": math.nan, "mase": math.nan}
    frame = _long_frame(actual[scored], forecast=predicted[scored])
    history = _long_frame(np.asarray(train, dtype=np.float64))
    scores = {"mae": losses.mae(frame, ["forecast"]), "rmse": losses.rmse(frame, ["forecast"]),
              "mase": losses.mase(frame, ["forecast"], season, history)}
    scores = {name: float(table["forecast"].iloc[0]) for name, table in scores.items()}
    return {**scores, "mase": scores["mase"] if math.isfinite(scores["mase"]) else math.nan}


def weighted_quantile_loss(actual: np.ndarray, quantiles: np.ndarray, levels: tuple[float, ...]) -> float:
    """WQL of quantile forecasts (H, Q) against actual (H,), over the steps where `actual` is observed.

    utilsforecast's `scaled_crps`: mean over q of 2 * sum_t pinball_q / sum_t |y_t| (Chronos' WQL); NaN when nothing
    is scored, sum |y| is 0 (utilsforecast divides by machine epsilon there) or a quantile is missing.
    """
    actual = np.asarray(actual, dtype=np.float64)
    scored = ~np.isnan(actual)
    predicted = np.asarray(quantiles, dtype=np.float64)[scored]  # (n, Q)
    if not scored.any() or np.abs(actual[scored]).sum() == 0 or np.isnan(predicted).any():
        return math.nan
    columns = [f"q{i}" for i in range(len(levels))]
    frame = _long_frame(actual[scored], **dict(zip(columns, predicted.T)))
    return float(losses.scaled_crps(frame, {"forecast": columns}, np.asarray(levels, dtype=np.float64))
                 ["forecast"].iloc[0])


def relative_scores(fields: dict[str, dict], metric: str) -> dict[str, float | None]:
    """Geometric mean over fields of each method's `metric` over seasonal-naive's (naive's where there is none).

    Only fields where both are finite and positive count; a method with no such field gets None.
    """
    ratios: dict[str, list[float]] = {}
    for entry in fields.values():
        reference = entry.get("seasonal_naive") or entry.get("naive") or {}
        base = reference.get(metric)
        for method, scores in entry.items():
            value = scores.get(metric) if isinstance(scores, dict) else None
            if method == "unit" or value is None or base is None:
                continue
            if math.isfinite(value) and math.isfinite(base) and value > 0 and base > 0:
                ratios.setdefault(method, []).append(math.log(value / base))
    methods = [m for entry in fields.values() for m in entry if m != "unit"]
    return {m: (math.exp(sum(ratios[m]) / len(ratios[m])) if ratios.get(m) else None) for m in dict.fromkeys(methods)}


def default_season(freq: str | None) -> int | None:
    """The seasonal period of the seasonal-naive baseline when none is given: the one training uses
    (`canvas.season_period`: 12 for monthly, 4 for quarterly, 52 weekly, 7 daily, 5 business-daily, 24 hourly grids);
    None otherwise."""
    return season_period(freq) or None


# ---------------------------------------------------------------------------------------------------- evaluate
def check_methods(methods) -> tuple[str, ...]:
    """The baselines to run: `methods` checked (None: all there are, without statsforecast the naive ones)."""
    if methods is None:
        return BASELINES if has_statsforecast() else NAIVE_METHODS
    methods = tuple(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in BASELINES]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(BASELINES)}")
    if any(m in STATS_METHODS for m in methods) and not has_statsforecast():
        raise ValueError(MISSING_STATSFORECAST)
    return methods


def _methods_and_note(methods) -> tuple[tuple[str, ...], str | None]:
    """`check_methods(methods)`, and the note (also logged) when the default had to leave statsforecast's out."""
    note = None
    if methods is None and not has_statsforecast():
        note = f"{MISSING_STATSFORECAST} (scored: model, naive, seasonal_naive)"
    methods = check_methods(methods)
    if note:
        logger.warning(note)
    return methods, note


def evaluate(model, data, holdout: int, *, season: int | None = None, methods=None, quantile_levels=None,
             time_column: str | None = None, freq: str | None = None, field: str | None = None) -> dict:
    """Hold out the last `holdout` steps, forecast them from the rest, and score model and baselines per field.

    The steps are the adapter's grid steps, or, when every field evaluated shares a coarser own frequency (a
    quarterly field on a weekly grid: a table of quarterly fields only, a single series of one, or `field=`), that
    calendar's: the last `holdout` quarters up to the fields' last observation are held out, forecast from
    everything before them (as `forecast` does, on its own calendar) and scored at exactly those quarters, with the
    season counted in quarters (4). A table mixing own frequencies stays on the grid.

    Args:
        methods: baselines next to the model, from `BASELINES` (default: all; without statsforecast the naive ones,
            said in one warning and in `result["note"]`).
        quantile_levels: the levels WQL averages over, for the model and every baseline alike: a subset of the
            adapter's trained levels (default: all of them). The model's point forecast is its median.
        season: the seasonal period in the steps held out (default: from their frequency).
        time_column, freq, field: as in `forecast` (`field` of a table: the one field scored, the others are its
            context).

    Returns {"holdout", "season", "mase_lag", "frequency" (of the steps: the grid's or the own calendar's),
    "methods", "quantile_levels", "note", "fields": {field: {"unit", "model", "naive", ...}}, "aggregate":
    {"reference", "mase": {method: x}, "wql": {...}}}; each method a dict of mae/rmse/mase/wql in the field's own
    units (wql NaN for a method without quantiles); `"predictions"` holds the model's median forecast frame,
    `"quantiles"` its `forecast_quantiles` frame and `"actuals"` / `"history"` the held-out and training frames of
    the fields scored, `"baseline_predictions"` {method: point forecast frame}, all indexed by the steps' dates (not
    JSON; `evaluation_json` drops them); `"overlap"` {field: warning} where the hold-out overlaps the adapter's
    training span (`training_overlap`, also logged).
    """
    methods, note = _methods_and_note(methods)
    spec = AdapterSpec.from_model(model)
    quantile_levels = tuple(spec.check_levels(quantile_levels))
    frame, grid = read_history(data, spec, time_column, freq, field)
    names = [field] if field is not None else list(frame.columns)
    context, train, actual, freq = split_holdout(frame, grid, holdout, spec, names)
    season = default_season(freq) if season is None else season
    if season is not None and season < 1:
        raise ValueError(f"season must be a positive number of steps, got {season}")
    if not (season and season > 1):
        methods = tuple(m for m in methods if m != "seasonal_naive")
    steps = holdout if freq == grid else _steps_to(train, actual)
    model_quantiles, schedule = GWMPipeline(model).predict_on_grid(  # (steps, S x levels), (steps, S)
        [(context, grid)], steps, sorted({*quantile_levels, 0.5}), [names])[0]
    if len(model_quantiles) != len(actual) or not model_quantiles.index.equals(actual.index):  # own calendar
        due = pd.DataFrame(schedule, index=model_quantiles.index).reindex(actual.index, fill_value=False)
        units = model_quantiles.attrs["units"]
        model_quantiles, schedule = model_quantiles.reindex(actual.index), due.to_numpy(dtype=bool)
        model_quantiles.attrs["units"] = units
    predictions = model_quantiles.xs(0.5, axis=1, level="level")  # the median is the point forecast
    check_finite(predictions.to_numpy(), schedule, list(predictions.columns), spec)
    predictions.attrs["units"] = model_quantiles.attrs["units"]
    scale_lag = season if season and season > 1 and len(train) > season else 1
    overlap = training_overlap(spec, actual.index, names)
    fields, forecasts = {}, {}
    for j, name in enumerate(names):
        forecasts[name] = _baselines(train[name].to_numpy(), schedule[:, j], methods, season, quantile_levels)
        points = {"model": predictions[name].to_numpy(), **forecasts[name][0]}
        quantiles = {"model": model_quantiles[name][list(quantile_levels)].to_numpy(), **forecasts[name][1]}
        fields[name] = {"unit": spec.fields[name].unit,
                        **_scores(train[name].to_numpy(), actual[name].to_numpy(), schedule[:, j], points, quantiles,
                                  scale_lag, quantile_levels)}
    aggregate = {"reference": "seasonal_naive (naive for a field without a season)",
                 "mase": relative_scores(fields, "mase"), "wql": relative_scores(fields, "wql")}
    return {"holdout": holdout, "season": season, "mase_lag": scale_lag, "frequency": freq,
            "methods": ["model", *methods], "quantile_levels": list(quantile_levels), "note": note,
            "overlap": overlap, "fields": fields, "aggregate": aggregate,
            "predictions": predictions, "quantiles": model_quantiles, "actuals": actual, "history": train,
            "baseline_predictions": {method: pd.DataFrame({name: forecasts[name][0][method] for name in forecasts
                                                           if method in forecasts[name][0]}, index=actual.index)
                                     for method in methods if any(method in f[0] for f in forecasts.values())}}


def split_holdout(frame: pd.DataFrame, freq: str | None, holdout, spec: AdapterSpec, names: list[str]
                  ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, str | None]:
    """Split a gridded (L, S) history for `evaluate`: (the grid rows before the hold-out, every column: what the
    forecast reads; the training part and the held-out part of the fields `names` as they are scored; the frequency
    of their steps).

    On the grid: the last `holdout` rows are held out. When `names` share a coarser own frequency
    (`AdapterSpec.calendar`) and the history has dates, the fields are read on that calendar (one row per period
    start, NaN where a period is missing) up to their last observation, and its last `holdout` periods are held out;
    the forecast reads the grid rows before the step holding the first of them. A hold-out that leaves less than one
    window of the adapter (or no observation of the fields) is a one-line DataError."""
    check_steps("holdout", holdout)
    own = spec.calendar(names) if isinstance(frame.index, pd.DatetimeIndex) and freq is not None else None
    if own is None:
        _check_left(len(frame), holdout, spec)
        return frame.iloc[:-holdout], frame[names].iloc[:-holdout], frame[names].iloc[-holdout:], freq
    starts, rows = own_periods(frame.index, freq, own)
    calendar = frame[names].iloc[rows].set_axis(starts, axis=0)  # (P, S_out) the fields on their own calendar
    observed = np.flatnonzero(calendar.notna().any(axis=1).to_numpy())
    if not len(observed):
        raise DataError(f"no value of {names} falls on a {own} period start: nothing to hold out")
    calendar, rows = calendar.iloc[:observed[-1] + 1], rows[:observed[-1] + 1]  # up to the fields' last observation
    if holdout >= len(calendar) or not calendar.iloc[:-holdout].notna().any().any():
        raise DataError(f"the data has {len(calendar)} {own} steps of {names} (up to the last observation); holding "
                        f"out {holdout} leaves {max(0, len(calendar) - holdout)}"
                        + (", with no observation" if holdout < len(calendar) else ""))
    cut = int(rows[len(calendar) - holdout])  # the grid step holding the first period held out
    _check_left(len(frame), len(frame) - cut, spec, f" steps of the {freq!r} grid ({holdout} {own} steps)")
    return frame.iloc[:cut], calendar.iloc[:-holdout], calendar.iloc[-holdout:], own


def _check_left(length: int, holdout: int, spec: AdapterSpec, steps: str = "") -> None:
    if length - holdout < spec.min_history():
        raise DataError(f"the data has {length} steps; holding out {holdout}{steps} leaves {length - holdout}, fewer "
                        f"than the {spec.min_history()} this adapter needs (context_len {spec.context_len} - horizon "
                        f"{spec.horizon})")


def _steps_to(train: pd.DataFrame, actual: pd.DataFrame) -> int:
    """The own-calendar steps a forecast from `train`'s last observation takes to reach `actual`'s last row."""
    observed = np.flatnonzero(train.notna().any(axis=1).to_numpy())
    return len(train) - int(observed[-1]) - 1 + len(actual)


def _scores(history: np.ndarray, actual: np.ndarray, due: np.ndarray, points: dict, quantiles: dict, scale_lag: int,
            levels: tuple[float, ...]) -> dict[str, dict]:
    """{method: mae/rmse/mase/wql} of one field; it is scored at its own steps only (a quarterly field: the
    quarters), every method alike, and its MASE lag is counted in its own steps."""
    truth = np.where(due, actual, np.nan)
    rows = np.flatnonzero(~np.isnan(history))
    spacing = own_spacing(rows)
    lag = max(1, round(scale_lag / spacing)) if spacing > 1 else scale_lag
    scored_history = history[rows] if spacing > 1 else history
    out = {}
    for method, point in points.items():
        out[method] = error_metrics(truth, point, scored_history, lag)
        out[method]["wql"] = (weighted_quantile_loss(truth, quantiles[method], levels) if method in quantiles
                              else math.nan)
    return out


def training_overlap(spec: AdapterSpec, holdout_index: pd.Index, names: list[str]) -> dict[str, str]:
    """{field: warning} for every field of `names` whose training span (recorded in the adapter) reaches into the
    hold-out: its scores there are in-sample, not forecasts of unseen data. Adapters without spans, or an index
    without dates, give none."""
    if not isinstance(holdout_index, pd.DatetimeIndex) or not len(holdout_index):
        return {}
    start, end = holdout_index[0], holdout_index[-1]
    warnings = {}
    for name, (first, last) in spec.spans.items():
        if name in names and pd.Timestamp(last) >= start and pd.Timestamp(first) <= end:
            warnings[name] = (f"{name}: the hold-out ({start.date()} .. {end.date()}) overlaps the adapter's training "
                              f"span ({first} .. {last}): these scores are in-sample, not forecasts of unseen data")
            logger.warning(warnings[name])
    return warnings


def _baselines(history: np.ndarray, due: np.ndarray, methods: tuple[str, ...], season: int | None,
               levels: tuple[float, ...]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One field's baseline forecasts of the hold-out: {method: point (holdout,)} and, for the methods that have
    them, {method: quantiles (holdout, Q)}. `history` (N,) is the training part, NaN between the field's observed
    rows; `due` (holdout,) where the field is scored.

    With statsforecast every method is its model, fitted on the field's own steps: a field observed on the grid's
    steps from its first observation on (gaps forward-filled, so a season stays a season), a coarser one (quarterly
    on a monthly grid) on its consecutive observations with its season counted in its own steps. Without it (the
    core install) naive and seasonal-naive are `naive_forecast` / `seasonal_naive_forecast` on the grid, without
    quantiles."""
    holdout, rows = len(due), np.flatnonzero(~np.isnan(history))
    if not has_statsforecast():
        points = {}
        if "naive" in methods:
            points["naive"] = naive_forecast(history, holdout)
        if "seasonal_naive" in methods:
            points["seasonal_naive"] = seasonal_naive_forecast(history, holdout, season)
        return points, {}
    if not due.any() or not len(rows):  # nothing to score or nothing to fit
        return {method: np.full(holdout, np.nan) for method in methods}, {}
    spacing = own_spacing(rows)
    own_season = max(1, round(season / spacing)) if season else 1
    observed = pd.Series(history[rows[0]:]).ffill().to_numpy() if spacing == 1 else history[rows]
    fitted = statistical_forecasts(observed, int(due.sum()), own_season, methods, levels)  # a failed fit: left out
    points, quantiles = {}, {}
    for method, (point, qs) in fitted.items():
        points[method] = np.full(holdout, np.nan)
        points[method][due] = point
        quantiles[method] = np.full((holdout, len(levels)), np.nan)
        quantiles[method][due] = qs
    return points, quantiles


def check_evaluate_request(history: pd.DataFrame, holdout, spec: AdapterSpec, freq: str | None = None,
                           field: str | None = None) -> None:
    """The one-line errors of `evaluate` for this gridded history and `holdout` (`split_holdout`), before any model
    is loaded."""
    split_holdout(history, freq, holdout, spec, [field] if field is not None else list(history.columns))


def evaluation_json(result: dict) -> dict:
    """The JSON-serialisable part of an `evaluate` result (NaN becomes null)."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    return clean({k: v for k, v in result.items() if k not in _NOT_JSON})


def format_evaluation(result: dict) -> str:
    """A markdown table (one row per field and method, best MASE of each field in bold) and the aggregate."""
    lines = [f"Hold-out: last {result['holdout']} steps" + (f" ({result['frequency']})" if result.get("frequency")
                                                           else "")
             + f"; MASE scaled by the in-sample {'seasonal ' if result['mase_lag'] > 1 else ''}naive error"
             + (f" (lag {result['mase_lag']})" if result["mase_lag"] > 1 else "")
             + "; WQL over quantiles " + ", ".join(f"{q:g}" for q in result["quantile_levels"]), "",
             "| field | unit | method | MAE | RMSE | MASE | WQL |", "|---|---|---|---:|---:|---:|---:|"]
    for name, entry in result["fields"].items():
        methods = {k: v for k, v in entry.items() if k != "unit"}
        best = min(methods, key=lambda m: methods[m]["mae"] if not math.isnan(methods[m]["mae"]) else math.inf)
        for method, scores in methods.items():
            cells = [_fmt(scores[k]) for k in ("mae", "rmse", "mase", "wql")]
            if method == best:
                cells[2] = f"**{cells[2]}**"
            lines.append(f"| {name} | {entry['unit'] or ''} | {method} | " + " | ".join(cells) + " |")
    aggregate = result["aggregate"]
    lines += ["", f"Geometric mean over fields relative to {aggregate['reference']}:"]
    for metric in ("mase", "wql"):
        lines.append(f"  {metric.upper()}: " + ", ".join(f"{m} {_fmt(v)}" for m, v in aggregate[metric].items()))
    if result.get("note"):
        lines += ["", f"Note: {result['note']}"]
    lines += [f"Warning: {warning}" for warning in (result.get("overlap") or {}).values()]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.4g}"


__all__ = ["BASELINES", "check_evaluate_request", "check_methods", "default_season", "error_metrics", "evaluate",
           "evaluation_json", "format_evaluation", "has_statsforecast", "naive_forecast", "relative_scores",
           "seasonal_naive_forecast", "split_holdout", "statistical_forecasts", "training_overlap",
           "weighted_quantile_loss"]
