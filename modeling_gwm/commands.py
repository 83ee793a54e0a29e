"""The `gwm` command line: train, forecast, impute, evaluate, plan a curriculum, count parameters, plot losses, push a
run, write the tiny base.

Every user error (a bad file, an unknown field, a horizon of 0, no network for a push) ends with exit code 2 and one
line `gwm <command>: error: ...` on stderr; set GWM_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

logger = logging.getLogger(__name__)

_EPILOGS = {
    "gwm": """example (after `python training/dag_train.py --output_dir outputs/gwm-demo`):
  gwm evaluate --adapter outputs/gwm-demo/final \\
      --data configuration/data/elnino_nino12_monthly.csv --columns sst=climate.enso.nino12_sst \\
      --holdout 12

`gwm COMMAND --help` shows each command's options and an example.""",
    "params": """example:
  gwm params --base configuration/tiny-cogvideox --d_model 32 --n_loops 2
  gwm params --architecture THUDM/CogVideoX-2b --d_model 256 --n_loops 4   # no download: a meta-device build""",
    "dag": """example:
  gwm dag --config configuration/curricula/demo.yaml""",
    "forecast": """columns: the data's columns must be field names of the adapter (e.g. climate.enso.nino12_sst);
map raw column names with --columns RAW=FIELD (repeatable or comma-separated): then only the mapped columns are read.

example:
  gwm forecast --adapter outputs/gwm-demo/final --data configuration/data/elnino_nino12_monthly.csv \\
      --columns sst=climate.enso.nino12_sst --prediction_length 12 --out preds.csv --plot preds.png""",
    "evaluate": """MASE divides a method's MAE by the in-sample MAE of the (seasonal) naive one-step forecast on the
training part; below 1 beats it. WQL is the weighted quantile loss of the quantile forecasts (Chronos' metric). The
aggregate is each method's geometric mean over fields relative to seasonal-naive. --season defaults to 12 for
monthly, 4 for quarterly, 7 for daily data. AutoETS and AutoARIMA need pip install -e ".[eval]" (statsforecast).

example:
  gwm evaluate --adapter outputs/gwm-demo/final --data configuration/data/elnino_nino12_monthly.csv \\
      --columns sst=climate.enso.nino12_sst --holdout 12 --json eval.json --plot eval.png""",
    "impute": """example:
  gwm impute --adapter outputs/gwm-demo/final --data gappy.csv --columns sst=climate.enso.nino12_sst \\
      --out filled.csv""",
    "train": """example:
  gwm make-tiny-base tiny-cogvideox && gwm train --base tiny-cogvideox --output_dir outputs/gwm-demo""",
    "make-tiny-base": """example:
  gwm make-tiny-base tiny-cogvideox && gwm train --base tiny-cogvideox""",
    "plot-losses": """example:
  gwm plot-losses outputs/gwm-demo --out losses.png""",
    "push": """example:
  gwm push outputs/gwm-demo --hub_model_id your-name/gwm-demo --private
  gwm push outputs/gwm-demo --dry_run                     # the files and sizes that would go up""",
}


class CommandError(ValueError):
    """A bad command-line value (e.g. a malformed --columns mapping)."""


# ---------------------------------------------------------------------------------------------------- helpers
def _recorded_base(adapter: str | None) -> str | None:
    """The base a local adapter folder records (read as plain JSON: a bad config is reported later, by the load)."""
    from .io_utils import read_json
    from .model.adapter_files import CONFIG_MAX_BYTES
    from .run_folder import ADAPTER_CONFIG_FILE
    try:
        config = read_json(os.path.join(adapter, ADAPTER_CONFIG_FILE), max_bytes=CONFIG_MAX_BYTES)
        base = (config.get("gwm_config") or {}).get("base_model_name_or_path") or config.get("base_model_name_or_path")
    except (OSError, TypeError, ValueError, AttributeError):
        return None
    return base if isinstance(base, str) else None


def _check_outputs(args, *flags: str) -> None:
    """The one check of every file a command writes, before the model loads or any work starts.

    Each `--flag` value of `args` must not be an input (--data, the --adapter or base folder, a run's folder), nor lie
    in an adapter or run folder, nor name the same file as another output, and its folder must be writable: a long
    run cannot destroy what the user owns or fail at its last step (see `output_paths.check_output_file`).
    """
    from .output_paths import OutputPathError, check_output_file

    adapter = getattr(args, "adapter", None)
    inputs = {"--data": getattr(args, "data", None), "--adapter": adapter, "--base": getattr(args, "base", None),
              "the adapter's base": _recorded_base(adapter) if adapter else None,
              "run folder": getattr(args, "output_dir", None)}
    written: dict[str, str] = {}
    for flag in flags:
        path = getattr(args, flag)
        if path is None:
            continue
        check_output_file(f"--{flag}", path, inputs)
        for other, earlier in written.items():
            if os.path.realpath(earlier) == os.path.realpath(path):
                raise OutputPathError(f"--{flag} {path}: is the same file as {other} {earlier}; give each output "
                                      "its own path")
        written[f"--{flag}"] = path


@contextlib.contextmanager
def _naming_adapter(args):
    """A non-finite forecast names the --adapter folder the user gave (the API names the adapter on the model)."""
    from .forecasting.pipeline import NonFiniteForecastError

    try:
        yield
    except NonFiniteForecastError as err:
        raise NonFiniteForecastError(f"--adapter {args.adapter}: {err}") from None


def _write_atomic(flag: str, path: str, render) -> None:
    """Write what `render(buffer)` puts in a BytesIO to `path` in one rename: never a half-written file."""
    import io

    from .io_utils import atomic_write_bytes
    from .output_paths import OutputPathError

    buffer = io.BytesIO()
    render(buffer)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as err:  # a full disk or a quota: the old file, if any, is still there whole
        raise OutputPathError(f"{flag} {path}: cannot write it: {err.strerror or err}; an earlier file there is left "
                              "whole") from None


def _spec(adapter: str, subfolder: str | None):
    """The adapter's fields and window from its adapter_config.json alone (fast: no weights, no base)."""
    from .forecasting.pipeline import AdapterSpec
    from .model.adapter_files import load_adapter_config

    return AdapterSpec.from_config(load_adapter_config(adapter, subfolder=subfolder), adapter_name=adapter)


# ---------------------------------------------------------------------------------------------------- commands
def cmd_params(args) -> int:
    from .model import budget

    if bool(args.architecture) == bool(args.base):
        raise CommandError("give exactly one of --base (a checkpoint to load) or --architecture (a known name)")
    if args.architecture:
        rows = budget.budget_for_architecture(args.architecture, args.d_model, args.n_loops)
    else:
        import peft

        from .model.loop import LoopConfig
        from .model.modeling_gwm import GWMModel

        model = GWMModel.from_pretrained(args.base, d_model=args.d_model)
        model = peft.get_peft_model(model, LoopConfig(n_loops=args.n_loops), adapter_name="default")
        rows = budget.parameter_budget(model)
    print(budget.format_budget(rows))
    return 0


def cmd_dag(args) -> int:
    from .training.curriculum import load_curriculum

    curriculum = load_curriculum(args.config)
    print(curriculum.plan())
    print("\n```mermaid\n" + curriculum.mermaid() + "\n```")
    return 0


def _table(args):
    """The --data file (CSV, Parquet or JSON(L); any other extension is read as CSV), its --columns renamed to
    fields; every error names the file."""
    from .tabular import FORMATS, DataError, read_table

    path, time_column, columns = args.data, args.time_column, {}
    for pair in (pair for value in args.columns or [] for pair in value.split(",") if pair.strip()):
        raw, sep, field = pair.partition("=")  # --columns RAW=FIELD, repeatable or comma-separated
        if not sep or not raw.strip() or not field.strip():
            raise CommandError(f"--columns expects RAW=FIELD pairs (e.g. sst=climate.enso.nino12_sst), got {pair!r}")
        raw, field = raw.strip(), field.strip()
        twin = next((r for r, f in columns.items() if f == field and r != raw), None)
        if raw in columns and columns[raw] != field:
            raise CommandError(f"--columns maps column {raw!r} to {columns[raw]!r} and to {field!r}")
        if twin is not None:
            raise CommandError(f"--columns maps columns {twin!r} and {raw!r} both to field {field!r}")
        columns[raw] = field
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    table = read_table(path, FORMATS.get(Path(path).suffix.lower(), "csv"), "--data")
    if time_column not in table.columns:
        raise DataError(f"{path}: no time column {time_column!r} (set --time_column); columns are "
                        f"{list(table.columns)}")
    absent = [c for c in columns if c not in table.columns]
    if absent:
        raise DataError(f"{path}: --columns names column(s) {absent} that are not in the file; columns are "
                        f"{list(table.columns)}")
    if columns:
        table = table[[time_column, *columns]].rename(columns=columns)
    return table


@contextlib.contextmanager
def _naming_data(args):
    """A data error found while reading the table names the --data file (and hints at --columns)."""
    from .tabular import DataError

    try:
        yield
    except DataError as err:
        hint = "; map raw column names with --columns RAW=FIELD" if str(err).startswith("unknown field(s)") and \
            not args.columns else ""
        raise DataError(f"{args.data}: {err}{hint}") from None


def _history(args, spec):
    """The --data table on the adapter's grid (`pipeline.read_history`): (history, its frequency)."""
    from .forecasting.pipeline import read_history

    table = _table(args)
    with _naming_data(args):
        return read_history(table, spec, time_column=args.time_column, freq=args.freq,
                            field=getattr(args, "field", None))


def cmd_forecast(args) -> int:
    from .forecasting.pipeline import check_forecast_request, forecast_quantiles
    from .model.modeling_gwm import GWMModel
    from .plots import plot_forecast

    device = _device(args)
    _check_outputs(args, "out", "plot")
    spec = _spec(args.adapter, args.subfolder)
    levels = spec.check_levels(args.quantiles or None) if args.quantiles is not None else [0.5]
    history, freq = _history(args, spec)
    check_forecast_request(len(history), args.prediction_length, spec)  # before loading the model: errors come fast
    model = GWMModel.from_pretrained(args.base, args.adapter, subfolder=args.subfolder, device=device)
    # the plot's 10-90 % band needs those levels even when only the median is written
    plotted = sorted({*levels, 0.5, *([q for q in (0.1, 0.9) if q in spec.quantile_levels] if args.plot else [])})
    with _naming_adapter(args):
        quantiles = forecast_quantiles(model, history, args.prediction_length, quantile_levels=plotted,
                                       freq=args.freq or freq, field=args.field)
    predictions = quantiles.xs(0.5, axis=1, level="level")
    if args.quantiles is None:
        table = predictions
    else:  # one column per field and level, "field@level"
        table = quantiles.loc[:, [c for c in quantiles.columns if c[1] in levels]]
        table.columns = [f"{name}@{level:g}" for name, level in table.columns]
    _write_atomic("--out", args.out, lambda buffer: table.to_csv(buffer, index_label=args.time_column))
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    n_fields = predictions.shape[1]
    per_level = f" × {len(levels)} quantile level{'s' if len(levels) > 1 else ''}" if args.quantiles is not None else ""
    print(f"\nwrote {args.out} ({len(predictions)} steps × {n_fields} field{'s' if n_fields > 1 else ''}{per_level})")
    if args.plot:
        _write_atomic("--plot", args.plot, lambda buffer: plot_forecast(
            history, predictions, buffer, quantiles=quantiles,
            title=f"GWM forecast of {args.prediction_length} steps ({args.adapter})"))
        print(f"wrote {args.plot}")
    return 0


def cmd_evaluate(args) -> int:
    from .forecasting.evaluation import (
        check_evaluate_request,
        check_methods,
        evaluate,
        evaluation_json,
        format_evaluation,
    )
    from .model.modeling_gwm import GWMModel
    from .plots import plot_forecast

    methods = check_methods([m.strip() for v in args.methods for m in v.split(",") if m.strip()]) \
        if args.methods else None  # before reading anything: a missing extra fails fast
    device = _device(args)
    _check_outputs(args, "json", "plot")
    spec = _spec(args.adapter, args.subfolder)
    history, freq = _history(args, spec)
    with _naming_data(args):  # before loading the model: errors come fast
        check_evaluate_request(history, args.holdout, spec, freq, args.field)
    if args.season is not None and args.season < 1:
        raise ValueError(f"--season must be a positive number of steps, got {args.season}")
    model = GWMModel.from_pretrained(args.base, args.adapter, subfolder=args.subfolder, device=device)
    with _naming_adapter(args):
        result = evaluate(model, history, args.holdout, season=args.season, methods=methods, freq=freq,
                          field=args.field)
    print(format_evaluation(result))
    if args.json:
        _write_atomic("--json", args.json, lambda buffer: buffer.write(
            (json.dumps(evaluation_json(result), indent=2) + "\n").encode("utf-8")))
        print(f"\nwrote {args.json}")
    if args.plot:
        _write_atomic("--plot", args.plot, lambda buffer: plot_forecast(
            result["history"], result["predictions"], buffer, actuals=result["actuals"],
            title=f"GWM hold-out forecast of the last {args.holdout} steps"
                  + (f" ({result['frequency']})" if result["frequency"] else ""), quantiles=result["quantiles"],
            baselines=result["baseline_predictions"]))
        print(f"wrote {args.plot}")
    return 0


def cmd_impute(args) -> int:
    from .forecasting.pipeline import impute, read_history
    from .model.modeling_gwm import GWMModel

    device = _device(args)
    _check_outputs(args, "out")
    spec = _spec(args.adapter, args.subfolder)
    table = _table(args)
    with _naming_data(args):
        before, _ = read_history(table, spec, time_column=args.time_column, freq=args.freq)  # errors before the load
        model = GWMModel.from_pretrained(args.base, args.adapter, subfolder=args.subfolder, device=device)
        with _naming_adapter(args):
            filled = impute(model, table, time_column=args.time_column, freq=args.freq)
    _write_atomic("--out", args.out, lambda buffer: filled.to_csv(buffer, index_label=args.time_column))
    count = int(before.isna().sum().sum() - filled.isna().sum().sum())
    print(f"filled {count} missing value(s) of {filled.shape[1]} field(s); wrote {args.out} ({len(filled)} steps)")
    return 0


def cmd_make_tiny_base(args) -> int:
    if os.path.exists(os.path.join(args.dir, "transformer")):
        raise CommandError(f"{args.dir} already holds a checkpoint (transformer/): give a new folder")
    from .model.base import make_tiny_cogvideox

    try:
        path = make_tiny_cogvideox(args.dir, seed=args.seed)
    except OSError as err:
        raise CommandError(f"{args.dir}: cannot write the tiny base there: {err.strerror or err}") from None
    print(f"wrote the tiny CogVideoX-architecture base (seed {args.seed}) to {os.path.abspath(path)}; train on it "
          f"with `gwm train --base {path}`")
    return 0


def cmd_plot_losses(args) -> int:
    from .plots import plot_loss_curves
    from .run_folder import RunFolder

    RunFolder(args.output_dir).require()
    _check_outputs(args, "out")
    _write_atomic("--out", args.out, lambda buffer: plot_loss_curves(args.output_dir, buffer))
    print(f"wrote {args.out}")
    return 0


def cmd_push(args) -> int:
    from .hub.hub import push_curriculum
    from .run_folder import RunFolder

    RunFolder(args.output_dir).require()
    if args.dry_run:
        return _print_upload_plan(args.output_dir, args.hub_model_id)
    if not args.hub_model_id:
        raise CommandError("--hub_model_id user/repo is required (only --dry_run goes without it)")
    url = push_curriculum(args.output_dir, args.hub_model_id, token=args.token or os.environ.get("HF_TOKEN"),
                          private=args.private or None)
    print(url)
    return 0


def _print_upload_plan(output_dir: str, repo_id: str | None) -> int:
    """What `gwm push` would upload (hub.plan_curriculum_upload), one file a line with its size; nothing is sent."""
    from .hub.hub import plan_curriculum_upload

    operations = plan_curriculum_upload(output_dir, repo_id=repo_id)
    sizes = [len(o.path_or_fileobj) if isinstance(o.path_or_fileobj, bytes) else os.path.getsize(o.path_or_fileobj)
             for o in operations]
    for operation, size in zip(operations, sizes):
        print(f"{size:>10,}  {operation.path_in_repo}")
    print(f"{len(operations)} files, {sum(sizes) / 1024:,.0f} KB would go to {repo_id or '<user>/<repo>'} "
          "(dry run: nothing uploaded)")
    return 0


# ---------------------------------------------------------------------------------------------------- parser
# `gwm params` builds the model (on the meta device for --architecture, but the GWM parts for real): beyond these a
# typo would try to allocate terabytes. d_model: configuration_gwm.MODEL_LIMITS; n_loops: curriculum.NODE_LIMITS.
PARAMS_LIMITS = {"d_model": 16_384, "n_loops": 64}


def _whole(what: str = "", high: int | None = None):
    """argparse type: a whole number (of `what`), in [1, high] when given, the limit named in the error; other range
    checks come later, with one clear line each."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number{what}, got {value!r}") from None
        if high is not None and not 1 <= number <= high:
            raise argparse.ArgumentTypeError(f"must be in [1, {high}] (commands.PARAMS_LIMITS), got {number}")
        return number
    return parse


def _device(args):
    """--device as a torch device, checked before anything is read (a missing CUDA is one line, exit 2)."""
    from .model.base import resolve_device

    return resolve_device(args.device, "--device")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="adapter folder (a run's node or final/) or Hub id")
    parser.add_argument("--base", default=None,
                        help="CogVideoX checkpoint (Hub id or folder); default: the base the adapter was trained on")
    parser.add_argument("--subfolder", default=None, help="the node's subfolder when --adapter is a Hub repo")
    parser.add_argument("--data", required=True, help="CSV, Parquet or JSON(L) file: a time column and value columns")
    parser.add_argument("--time_column", default="date", help="name of the time column (default: date)")
    parser.add_argument("--columns", action="append", metavar="RAW=FIELD",
                        help="map a raw column to a field of the adapter (repeatable, or comma-separated)")
    parser.add_argument("--freq", default=None,
                        help="pandas frequency of the series (default: the adapter's grid, else inferred); it may "
                        "name the adapter's grid or the own frequency of the fields forecast")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda or cuda:N (default: auto, CUDA when there is a CUDA device, else the CPU)")


def _add_table_commands(add) -> None:
    """forecast, evaluate and impute: an adapter and a --data table in, a file out."""
    p = add("forecast", "Forecast the steps after a table's last row with a trained adapter, in the data's units.")
    _model_arguments(p)
    p.add_argument("--prediction_length", "--horizon", dest="prediction_length", type=_whole(" of steps"),
                   required=True, help="steps to predict: of the adapter's grid, or of the fields' own calendar when "
                   "they share a coarser frequency (quarters of a quarterly field); rolled out beyond the adapter's "
                   "own horizon; --horizon is an alias")
    p.add_argument("--field", default=None, help="forecast this field only (the table's other fields are its "
                   "context); a field coarser than the adapter's grid comes out on its own calendar (e.g. quarter "
                   "starts), --prediction_length counted in its own steps")
    p.add_argument("--out", required=True, help="CSV to write: the time column and one column per field (the median)")
    p.add_argument("--quantiles", type=float, nargs="*", default=None, metavar="LEVEL",
                   help="write quantile columns FIELD@LEVEL instead (e.g. co2@0.1); the levels must be among the "
                   "adapter's trained ones; with no LEVEL, all of them")
    p.add_argument("--plot", default=None, help="PNG of the forecast after the recent history with its 10-90 %% "
                   "band, one panel per field")
    p.set_defaults(func=cmd_forecast)

    p = add("evaluate", "Hold out the last steps, forecast them, and score the model next to naive baselines.")
    _model_arguments(p)
    p.add_argument("--holdout", type=_whole(" of steps"), required=True, help="steps held out at the end: of the "
                   "adapter's grid, or of the fields' own calendar when they share a coarser frequency (the last "
                   "quarters of a quarterly field)")
    p.add_argument("--field", default=None, help="score this field only (the table's other fields are its context); "
                   "a field coarser than the adapter's grid is held out and scored on its own calendar")
    p.add_argument("--season", type=_whole(" of steps"), default=None,
                   help="seasonal period for seasonal-naive and MASE, in the steps held out (default: from their "
                   "frequency)")
    p.add_argument("--methods", action="append", metavar="METHOD",
                   help="baselines next to the model: naive, seasonal_naive, auto_ets, auto_arima, auto_theta "
                        "(repeatable or comma-separated; default: all, the statsforecast ones when installed)")
    p.add_argument("--json", default=None, help="write the scores as JSON here")
    p.add_argument("--plot", default=None, help="PNG of forecast vs. actuals, one panel per field")
    p.set_defaults(func=cmd_evaluate)

    p = add("impute", "Fill the missing values of a table's known fields with a trained adapter (the data's units).")
    _model_arguments(p)
    p.add_argument("--out", required=True, help="CSV to write: the table on its regular grid, gaps filled (the median)")
    p.set_defaults(func=cmd_impute)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gwm", description="GWM: a world model for heterogeneous time series on a frozen CogVideoX transformer.",
        epilog=_EPILOGS["gwm"], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, epilog=_EPILOGS[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = add("params", "Parameter budget: frozen base, adapter and trainable parts, in a table.")
    p.add_argument("--base", default=None, help="local CogVideoX checkpoint (diffusers layout) or Hub id to load")
    p.add_argument("--architecture", default=None, metavar="NAME",
                   help="a known architecture (e.g. THUDM/CogVideoX-2b) built on the meta device: nothing downloaded")
    p.add_argument("--d_model", type=_whole(high=PARAMS_LIMITS["d_model"]), default=128,
                   help="canvas width (default: 128, GWMConfig's)")
    p.add_argument("--n_loops", type=_whole(high=PARAMS_LIMITS["n_loops"]), default=3,
                   help="loops per block (default: 3, GWMConfig's)")
    p.set_defaults(func=cmd_params)

    p = add("dag", "Validate a curriculum and show its training plan and a mermaid graph.")
    p.add_argument("--config", required=True, help="curriculum YAML")
    p.set_defaults(func=cmd_dag)

    _add_table_commands(add)

    p = add("train", "Train a curriculum (default: the shipped demo); `gwm train --help` lists its flags.")
    p.set_defaults(func=None)  # main() hands `gwm train ...` to train_cli before this parser sees it

    p = add("make-tiny-base", "Write the tiny seeded CogVideoX-architecture base (2 blocks) of the tests and demo.")
    p.add_argument("dir", help="new folder for the checkpoint (diffusers layout: DIR/transformer/)")
    p.add_argument("--seed", type=int, default=0, help="weights' seed (default: 0, the shipped base's)")
    p.set_defaults(func=cmd_make_tiny_base)

    p = add("plot-losses", "Plot every node's training and validation loss of a run on one axis.")
    p.add_argument("output_dir", help="a run's --output_dir (with dag.json)")
    p.add_argument("--out", default="losses.png", help="PNG to write (default: losses.png)")
    p.set_defaults(func=cmd_plot_losses)

    p = add("push", "Publish a whole run to one Hub repo: one subfolder per node, with model cards.")
    p.add_argument("output_dir", help="a run's --output_dir (with dag.json)")
    p.add_argument("--hub_model_id", default=None, help="user/repo (required unless --dry_run)")
    p.add_argument("--dry_run", action="store_true", help="print the files that would go up and their sizes")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the cached login)")
    p.set_defaults(func=cmd_push)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from .hub.hub import HubOfflineError
    from .model.adapter_files import AdapterLoadError
    from .model.base import BaseLoadError
    from .model.loop import AdapterMismatchError
    from .tabular import DataError
    from .training.curriculum import CurriculumError

    return (DataError, AdapterLoadError, AdapterMismatchError, BaseLoadError, CurriculumError, HubOfflineError,
            ValueError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # the training command line has its own parser (TrainingArguments)
        from .training.train_cli import main as train

        return train(argv[1:], prog="gwm train")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return args.func(args)
    except _user_errors() as err:
        if os.environ.get("GWM_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"gwm {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
