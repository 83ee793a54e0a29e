"""The bad-input matrix: every case is a user mistake that must end in one clear line naming the culprit.

Each case runs against a fresh copy of a small trained output directory (nodes a and b, adapter folders included)
and asserts: the documented exception type (Python API cases) or exit code 2 from `training/dag_train.py`'s
`main()` (CLI cases; two of them in a real subprocess with a resource limit or another user), a one-line message
that names the file, node, field or flag at fault, no traceback, and no earlier output changed (every file that
existed before has the same bytes; dag.json still parses and still marks a and b done).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from modeling_gwm import commands
from modeling_gwm.forecasting.pipeline import AdapterSpec, NonFiniteForecastError, forecast, read_history
from modeling_gwm.model.adapter_files import AdapterLoadError, load_adapter_config
from modeling_gwm.model.base import BaseLoadError, make_tiny_cogvideox
from modeling_gwm.model.configuration_gwm import GWMConfig
from modeling_gwm.model.data import DataSource, build_node_data
from modeling_gwm.model.loop import AdapterMismatchError
from modeling_gwm.model.modeling_gwm import GWMModel
from modeling_gwm.tabular import DataError
from modeling_gwm.training.callbacks import FaultInjectionCallback
from modeling_gwm.training.curriculum import CurriculumError, load_curriculum
from modeling_gwm.training.trainer import DAGCurriculumTrainer, NonFiniteError

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "configuration" / "data"
TINY_BASE = REPO / "configuration" / "tiny-cogvideox"
DAG_TRAIN = REPO / "training" / "dag_train.py"
sys.path.insert(0, str(REPO / "training"))
import dag_train  # noqa: E402

SOURCES = {
    "us_macro": {"path": str(DATA / "us_macro_quarterly.csv"), "frequency": "QS",
                 "fields": {"macro.us.unemployment": "unemp", "macro.us.inflation": "infl"}},
    "co2": {"path": str(DATA / "co2_mauna_loa_monthly.csv"), "frequency": "MS",
            "fields": {"climate.co2.mauna_loa": "co2"}},
}


def spec() -> dict:
    return {
        "model": {"base": str(TINY_BASE), "d_model": 16, "seed": 0},
        "defaults": {"steps": 2, "batch_size": 4, "context_len": 12, "horizon": 2, "n_loops": 2,
                     "learning_rate": 0.005, "eval_windows": 4, "checkpoint_every": 1},
        "sources": json.loads(json.dumps(SOURCES)),
        "nodes": [{"name": "a", "sources": ["us_macro"]}, {"name": "b", "sources": ["co2"]},
                  {"name": "j", "parents": ["a", "b"], "sources": ["us_macro", "co2"]}],
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """An output directory where nodes a and b are complete (j is not): what a user's earlier run left."""
    root = tmp_path_factory.mktemp("trained")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(spec(), sort_keys=False))
    DAGCurriculumTrainer(curriculum=load_curriculum(config), output_dir=str(root / "out"), only_nodes=["a", "b"],
                         write_cards=False).run()
    return root


class Env:
    """What a case works with: a copy of the trained run, its curriculum, and a scratch folder."""

    def __init__(self, tmp: Path, trained: Path):
        self.tmp = tmp
        self.out = tmp / "out"
        shutil.copytree(trained / "out", self.out)
        self.config = tmp / "tiny.yaml"
        self.config.write_text(yaml.safe_dump(spec(), sort_keys=False))
        self.data = tmp / "macro.csv"  # a user's data file for the `gwm` cases (node a's fields, raw column names)
        shutil.copyfile(DATA / "us_macro_quarterly.csv", self.data)

    def yaml(self, text_or_spec, name: str = "bad.yaml") -> Path:
        path = self.tmp / name
        path.write_text(text_or_spec if isinstance(text_or_spec, str) else yaml.safe_dump(text_or_spec))
        return path

    def spec_with(self, edit) -> Path:
        s = spec()
        edit(s)
        return self.yaml(s)

    def adapter(self, edit=None) -> Path:
        """A copy of node a's adapter folder, optionally damaged by `edit(folder)`."""
        folder = self.tmp / "adapter"
        shutil.copytree(self.out / "a", folder)
        if edit:
            edit(folder)
        return folder

    def csv(self, text: str, name: str = "bad.csv") -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    def cli(self, *args: str) -> list[str]:
        return ["--output_dir", str(self.out), *args]


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _source(path: Path, **fields) -> DataSource:
    return DataSource.from_dict("src", {"path": str(path), "fields": fields or {"x.value": "value"}})


def _train_node_j(env: Env, *extra: str) -> list[str]:
    return env.cli("--config", str(env.config), "--resume", "--nodes", "j", "--max_steps", "1", *extra)


def _wide_base(env: Env) -> Path:
    return Path(make_tiny_cogvideox(env.tmp / "wide", num_attention_heads=2, attention_head_dim=48))


def _gwm_inputs(env: Env, adapter: str | Path = "a") -> list[str]:
    """--adapter (a node of the trained run, or a folder), --data (the user's copy) and the column mapping."""
    folder = env.out / adapter if isinstance(adapter, str) else adapter
    return ["--adapter", str(folder), "--data", str(env.data),
            "--columns", "unemp=macro.us.unemployment,infl=macro.us.inflation"]


def _gwm_forecast(env: Env, *outputs: str, adapter: str | Path = "a") -> list[str]:
    return ["gwm", "forecast", *_gwm_inputs(env, adapter), "--horizon", "2", *outputs]


def _link(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def _notes(env: Env) -> Path:
    """A folder of the user's own, outside the run: nothing may be written there."""
    folder = env.tmp / "notes"
    folder.mkdir(exist_ok=True)
    (folder / "README.md").write_text("my notes\n")
    return folder


def _alias_bomb(tail: str) -> str:
    """A YAML 'billion laughs': anchor l8 expands to 9**8 (43 million) strings; `tail` refers to it."""
    lines = ['l0: &l0 "lol"'] + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "\n".join(lines) + "\n" + tail


def _config_to_dev_zero(folder: Path) -> None:
    (folder / "adapter_config.json").unlink()
    _link(folder / "adapter_config.json", Path("/dev/zero"))


def _spec_text(old: str, new: str) -> str:
    """The test curriculum as YAML text with one edit a dict cannot hold (a key twice)."""
    text = yaml.safe_dump(spec(), sort_keys=False)
    assert old in text
    return text.replace(old, new, 1)


def _other_run(env: Env, edit, *extra: str) -> list[str]:
    """A copy of the run (`run2`) changed by `edit(folder)`, then node j trained into it."""
    run = env.tmp / "run2"
    shutil.copytree(env.out, run)
    edit(run)
    return ["--output_dir", str(run), "--config", str(env.config), "--nodes", "j", "--max_steps", "1", *extra]


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:300])


def _old_run_truncated_a(run: Path) -> None:
    """A run from before adapter checksums were recorded, whose node a's adapter was truncated since."""
    _edit_json(run / "a" / "metrics.json", lambda m: m.pop("adapter_sha256"))
    _truncate(run / "a" / "adapter_model.safetensors")


def _edit_field(folder: Path, **values) -> None:
    _edit_json(folder / "adapter_config.json", lambda c: c["fields"][0].update(values))


def _plot_losses_of_copy(env: Env, edit) -> list[str]:
    """`gwm plot-losses` of a copy of the run whose node a's metrics.json is changed by `edit(metrics)`."""
    run = env.tmp / "run2"
    shutil.copytree(env.out, run)
    _edit_json(run / "a" / "metrics.json", edit)
    return ["gwm", "plot-losses", str(run), "--out", str(env.tmp / "losses.png")]


def _mkdir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def _nan_adapter(env: Env) -> Path:
    """Node a's adapter with every weight NaN: what a diverged run that saved anyway would leave."""
    def poison(folder: Path) -> None:
        weights = folder / "adapter_model.safetensors"
        tensors = load_file(str(weights))
        save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, str(weights))
    return env.adapter(poison)


def _drop_frequency(folder: Path) -> None:
    """An adapter config from before the grid frequency was recorded: the history's grid comes from freq."""
    _edit_json(folder / "adapter_config.json", lambda c: [f.pop("frequency", None) for f in c["fields"]])


def _macro_history(env: Env):
    import pandas as pd

    columns = {"unemp": "macro.us.unemployment", "infl": "macro.us.inflation"}
    return pd.read_csv(env.data)[["date", *columns]].rename(columns=columns)


# (id, what to run, expected: an exception type or 2 = exit code of dag_train.main, text the message must contain)
# "what to run" gets an Env and returns a zero-argument callable (API) or an argv list (CLI).
CASES = [
    # --------------------------------------------------------------------------------------- curriculum YAML
    ("yaml-malformed", lambda e: lambda: load_curriculum(e.yaml("nodes: [a, b\n")), CurriculumError, "bad.yaml"),
    ("yaml-empty-file", lambda e: lambda: load_curriculum(e.yaml("")), CurriculumError, "bad.yaml"),
    ("yaml-top-level-list", lambda e: lambda: load_curriculum(e.yaml("- a\n- b\n")), CurriculumError, "bad.yaml"),
    ("yaml-unknown-top-key", lambda e: lambda: load_curriculum(e.spec_with(lambda s: s.update(nodez=[]))),
     CurriculumError, "nodez"),
    ("yaml-no-nodes", lambda e: lambda: load_curriculum(e.spec_with(lambda s: s.pop("nodes"))),
     CurriculumError, "no nodes"),
    ("yaml-cycle", lambda e: lambda: load_curriculum(e.spec_with(lambda s: s["nodes"][0].update(parents=["j"]))),
     CurriculumError, "cycle"),
    ("yaml-dotdot-node-name", lambda e: lambda: load_curriculum(e.spec_with(
        lambda s: s["nodes"][0].update(name="../x"))), CurriculumError, "'../x'"),
    ("yaml-absolute-node-name", lambda e: lambda: load_curriculum(e.spec_with(
        lambda s: s["nodes"][0].update(name="/etc/x"))), CurriculumError, "'/etc/x'"),
    ("yaml-unknown-node-key", lambda e: lambda: load_curriculum(e.spec_with(lambda s: s["nodes"][1].update(stepz=3))),
     CurriculumError, "stepz"),
    ("yaml-wrong-type-steps", lambda e: lambda: load_curriculum(e.spec_with(
        lambda s: s["nodes"][1].update(steps="ten"))), CurriculumError, "steps"),
    ("yaml-negative-learning-rate", lambda e: lambda: load_curriculum(e.spec_with(
        lambda s: s["defaults"].update(learning_rate=-1.0))), CurriculumError, "learning_rate"),
    ("yaml-unknown-parent", lambda e: lambda: load_curriculum(e.spec_with(
        lambda s: s["nodes"][2].update(parents=["a", "ghost"]))), CurriculumError, "ghost"),
    ("yaml-unknown-source", lambda e: lambda: load_curriculum(e.spec_with(
        lambda s: s["nodes"][0].update(sources=["nowhere"]))), CurriculumError, "nowhere"),
    ("yaml-unknown-model-key", lambda e: lambda: load_curriculum(e.spec_with(lambda s: s["model"].update(width=3))),
     CurriculumError, "width"),
    ("yaml-merge-weights-count", lambda e: lambda: load_curriculum(e.spec_with(
        lambda s: s["nodes"][2].update(merge={"method": "linear", "weights": [1.0]}))), CurriculumError, "'j'"),
    ("yaml-duplicate-node", lambda e: lambda: load_curriculum(e.spec_with(
        lambda s: s["nodes"].append({"name": "a", "sources": ["co2"]}))), CurriculumError, "'a'"),
    ("yaml-source-extra-key", lambda e: lambda: load_curriculum(e.spec_with(
        lambda s: s["sources"]["co2"].update(colour="red"))), CurriculumError, "colour"),
    # --------------------------------------------------------------------------------------- data files
    ("data-missing-file", lambda e: lambda: _source(e.tmp / "nope.csv").read(), DataError, "nope.csv"),
    ("data-empty-file", lambda e: lambda: _source(e.csv("")).read(), DataError, "bad.csv"),
    ("data-missing-column", lambda e: lambda: _source(e.csv("date,v\n2000-01-01,1\n")).read(), DataError, "value"),
    ("data-non-numeric", lambda e: lambda: _source(e.csv("date,value\n2000-01-01,abc\n2000-02-01,x\n")).read(),
     DataError, "value"),
    ("data-bad-dates", lambda e: lambda: _source(e.csv("date,value\nsoon,1\nlater,2\n")).read(), DataError, "date"),
    ("data-unknown-transform", lambda e: lambda: _source(e.csv("date,value\n2000-01-01,1\n"),
                                                         **{"x.value": {"column": "value", "transform": "cube"}}),
     DataError, "cube"),
    ("data-too-short", lambda e: lambda: build_node_data(
        [_source(e.csv("date,value\n2000-01-01,1\n2000-02-01,2\n2000-03-01,3\n"))], None, context_len=12),
     DataError, "src"),
    # --------------------------------------------------------------------------------------- adapter folders
    ("adapter-no-config", lambda e: lambda: GWMModel.from_pretrained(
        TINY_BASE, adapter=e.adapter(lambda f: (f / "adapter_config.json").unlink())), AdapterLoadError,
     "adapter_config.json"),
    ("adapter-config-not-json", lambda e: lambda: GWMModel.from_pretrained(
        TINY_BASE, adapter=e.adapter(lambda f: (f / "adapter_config.json").write_text("{oops"))), AdapterLoadError,
     "adapter_config.json"),
    ("adapter-other-peft-method", lambda e: lambda: GWMModel.from_pretrained(TINY_BASE, adapter=e.adapter(
        lambda f: (f / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 8, "target_modules": ["to_q"], "base_model_name_or_path": "x"})))),
     AdapterLoadError, "LORA"),
    ("adapter-truncated-safetensors", lambda e: lambda: GWMModel.from_pretrained(TINY_BASE, adapter=e.adapter(
        lambda f: (f / "adapter_model.safetensors").write_bytes((f / "adapter_model.safetensors").read_bytes()[:300]))),
     AdapterLoadError, "adapter_model.safetensors"),
    ("adapter-foreign-safetensors", lambda e: lambda: GWMModel.from_pretrained(TINY_BASE, adapter=e.adapter(
        lambda f: save_file({"encoder.weight": torch.ones(3, 3)}, str(f / "adapter_model.safetensors")))),
     (AdapterLoadError, AdapterMismatchError), "adapter"),
    ("adapter-pickle-only", lambda e: lambda: GWMModel.from_pretrained(TINY_BASE, adapter=e.adapter(
        lambda f: (f / "adapter_model.safetensors").rename(f / "adapter_model.bin"))), AdapterLoadError,
     "adapter_model.safetensors"),
    ("adapter-base-of-another-width", lambda e: lambda: GWMModel.from_pretrained(_wide_base(e), adapter=e.adapter()),
     AdapterMismatchError, "inner_dim"),
    ("adapter-config-wrong-type", lambda e: lambda: GWMModel.from_pretrained(TINY_BASE, adapter=e.adapter(
        lambda f: _edit_json(f / "adapter_config.json", lambda c: c.update(n_loops="two")))), AdapterLoadError,
     "n_loops"),
    # --------------------------------------------------------------------------------------- model configs
    ("config-unknown-backbone", lambda e: lambda: GWMConfig(backbone="vit"), ValueError, "backbone"),
    ("config-bad-d-model", lambda e: lambda: GWMConfig(d_model=0), ValueError, "d_model"),
    ("base-missing-folder", lambda e: lambda: GWMModel.from_pretrained(e.tmp / "no-base", d_model=16),
     BaseLoadError, "no-base"),
    # --------------------------------------------------------------------------------------- CLI flags (main())
    ("cli-missing-config", lambda e: e.cli("--config", str(e.tmp / "gone.yaml")), 2, "gone.yaml"),
    ("cli-unknown-node", lambda e: e.cli("--config", str(e.config), "--resume", "--nodes", "zzz"), 2, "zzz"),
    ("cli-trained-dir-without-resume", lambda e: e.cli("--config", str(e.config)), 2, "--resume"),
    ("cli-push-without-repo", lambda e: e.cli("--config", str(e.config), "--resume", "--push_to_hub"), 2,
     "--hub_model_id"),
    ("cli-bad-mixed-precision", lambda e: e.cli("--mixed_precision", "fp8"), 2, "--mixed_precision"),
    ("cli-bad-nonfinite", lambda e: e.cli("--nonfinite", "ignore"), 2, "--nonfinite"),
    ("cli-indivisible-accumulation", lambda e: _train_node_j(e, "--gradient_accumulation_steps", "3"), 2,
     "batch_size"),
    ("cli-missing-base", lambda e: _train_node_j(e, "--base", str(e.tmp / "no-base")), 2, "no-base"),
    ("cli-bad-data-file", lambda e: e.cli("--config", str(e.spec_with(
        lambda s: s["sources"]["co2"].update(path=str(e.csv("date,co2\n"))))), "--resume", "--nodes", "j",
        "--no_deps"), 2, "bad.csv"),
    # ---------------------------------------------- the learning-rate schedule and the best-step settings (issue 18)
    ("cli-unknown-lr-scheduler", lambda e: e.cli("--config", str(e.spec_with(
        lambda s: s["nodes"][1].update(lr_scheduler_type="cosine_annealing")))), 2,
     "bad.yaml: node 'b': unknown lr_scheduler_type 'cosine_annealing'"),
    ("cli-negative-warmup", lambda e: e.cli("--config", str(e.spec_with(
        lambda s: s["nodes"][1].update(warmup_steps=-5)))), 2, "bad.yaml: node 'b': warmup_steps"),
    ("cli-warmup-ratio-over-one", lambda e: e.cli("--config", str(e.spec_with(
        lambda s: s["defaults"].update(warmup_ratio=1.5)))), 2, "bad.yaml: node 'a': warmup_ratio"),
    ("cli-eval-every-zero", lambda e: e.cli("--config", str(e.spec_with(
        lambda s: s["nodes"][1].update(eval_every=0)))), 2, "bad.yaml: node 'b': eval_every"),
    ("cli-bad-early-stopping-patience", lambda e: e.cli("--config", str(e.spec_with(
        lambda s: s["nodes"][1].update(early_stopping_patience=0)))), 2, "bad.yaml: node 'b': early_stopping_patience"),
    ("cli-early-stopping-patience-not-a-number", lambda e: e.cli("--config", str(e.spec_with(
        lambda s: s["nodes"][2].update(early_stopping_patience="soon")))), 2,
     "bad.yaml: node 'j': early_stopping_patience"),
    # ---------------------------------------------- baddata: silent wrong results and tracebacks (issue 14, 2 and 3)
    ("data-mixed-utc-offsets", lambda e: lambda: _source(e.csv(
        "date,value\n2000-01-01T00:00:00+05:00,1\n2000-02-01T00:00:00+04:00,2\n")).read(), DataError,
     "column 'date': time stamps with different UTC offsets"),
    ("data-frequency-ns-on-monthly", lambda e: lambda: DataSource.from_dict(
        "co2", {**SOURCES["co2"], "frequency": "ns"}).read(), DataError, "source 'co2': 1958-03-01"),
    ("yaml-dotted-node-name", lambda e: lambda: load_curriculum(e.spec_with(
        lambda s: s["nodes"][0].update(name="a.b"))), CurriculumError, "'a.b'"),
    ("adapter-config-max-fields-huge", lambda e: lambda: GWMModel.from_pretrained(TINY_BASE, adapter=e.adapter(
        lambda f: _edit_json(f / "adapter_config.json", lambda c: c["gwm_config"].update(max_fields=10**10)))),
     AdapterLoadError, "adapter_config.json: gwm_config.max_fields"),
    ("adapter-config-field-without-name", lambda e: lambda: GWMModel.from_pretrained(TINY_BASE, adapter=e.adapter(
        lambda f: _edit_json(f / "adapter_config.json", lambda c: c["fields"][0].pop("name")))),
     AdapterLoadError, "adapter_config.json: fields[0]"),
    ("adapter-config-fields-string", lambda e: lambda: GWMModel.from_pretrained(TINY_BASE, adapter=e.adapter(
        lambda f: _edit_json(f / "adapter_config.json", lambda c: c.update(fields="abc")))),
     AdapterLoadError, "adapter_config.json: fields"),
    ("adapter-config-target-everything", lambda e: lambda: GWMModel.from_pretrained(TINY_BASE, adapter=e.adapter(
        lambda f: _edit_json(f / "adapter_config.json", lambda c: c.update(target_modules=".*")))),
     AdapterLoadError, "adapter_config.json: target_modules '.*'"),
    ("adapter-config-unknown-peft-type", lambda e: lambda: GWMModel.from_pretrained(TINY_BASE, adapter=e.adapter(
        lambda f: _edit_json(f / "adapter_config.json", lambda c: c.update(peft_type="FOO")))),
     AdapterLoadError, "adapter_config.json: peft_type 'FOO'"),
    ("adapter-config-json-list", lambda e: lambda: GWMModel.from_pretrained(TINY_BASE, adapter=e.adapter(
        lambda f: (f / "adapter_config.json").write_text("[1, 2]"))), AdapterLoadError,
     "adapter_config.json must hold a JSON object"),
    ("adapter-weights-missing-tensor", lambda e: lambda: GWMModel.from_pretrained(TINY_BASE, adapter=e.adapter(
        lambda f: _edit_weights(f, lambda w: w.pop(_codec_key(w))))), AdapterMismatchError,
     "1 missing tensor(s) codec."),
    ("adapter-weights-codec-wrong-shape", lambda e: lambda: GWMModel.from_pretrained(TINY_BASE, adapter=e.adapter(
        lambda f: _edit_weights(f, lambda w: w.update({_codec_key(w): torch.zeros(7, 5)})))), AdapterMismatchError,
     "of shape (7, 5) (model expects"),
    ("adapter-weights-unknown-tensor", lambda e: lambda: GWMModel.from_pretrained(TINY_BASE, adapter=e.adapter(
        lambda f: _edit_weights(f, lambda w: w.update({"base_model.model.spare.weight": torch.zeros(3)})))),
     AdapterMismatchError, "unknown tensor(s) spare.weight"),
    ("cli-dag-json-null", lambda e: _run_copy(e, "null"), 2, "dag.json must hold a JSON object"),
    ("cli-dag-json-corrupt", lambda e: _run_copy(e, '{"nodes": {'), 2, "dag.json is not valid JSON"),
    ("cli-resume-changed-lr-of-complete-node", lambda e: _resume_j(e, lambda s: s["nodes"][0].update(
        learning_rate=0.01)), 2, "node 'a' was trained in"),
    ("cli-resume-raised-lr-mid-node", lambda e: _resume_j(e, lambda s: s["nodes"][2].update(learning_rate=0.01),
                                                          half_trained=True), 2, "learning_rate 0.005 -> 0.01"),
    ("cli-resume-changed-context-len-mid-node", lambda e: _resume_j(
        e, lambda s: s["nodes"][2].update(context_len=10), half_trained=True), 2, "context_len 12 -> 10"),
    ("cli-resume-source-added-to-finished-parent", lambda e: _resume_j(e, _add_sunspots_to_a), 2,
     "sources ['us_macro'] -> ['us_macro', 'sun']"),
    ("cli-resume-override-parent-lacks-field", lambda e: _resume_j(e, _add_sunspots_to_a, "--allow_changed_config"),
     2, "solar.sunspots"),
    # ---------------------------------------------- end of baddata block
    # ------------------------------------------------ badcli: outputs never overwrite inputs; limits; non-finite
    # `gwm` cases run modeling_gwm.commands.main; the input data file (Env.data) must come through unchanged.
    ("gwm-forecast-out-is-data", lambda e: _gwm_forecast(e, "--out", str(e.data)), 2, "--out"),
    ("gwm-forecast-out-symlink-to-data", lambda e: _gwm_forecast(e, "--out", str(_link(e.tmp / "l.csv", e.data))),
     2, "--data"),
    ("gwm-forecast-out-relative-data", lambda e: _gwm_forecast(e, "--out", os.path.relpath(e.tmp / "." / "macro.csv")),
     2, "--out"),
    ("gwm-forecast-out-adapter-config", lambda e: _gwm_forecast(e, "--out", str(e.out / "a" / "adapter_config.json")),
     2, "adapter_config.json"),
    ("gwm-forecast-plot-adapter-weights", lambda e: _gwm_forecast(
        e, "--out", str(e.tmp / "p.csv"), "--plot", str(e.out / "a" / "adapter_model.safetensors")), 2, "--plot"),
    ("gwm-forecast-out-in-run-folder", lambda e: _gwm_forecast(e, "--out", str(e.out / "preds.csv"), adapter="b"),
     2, "training-run folder"),
    ("gwm-forecast-out-in-base", lambda e: _gwm_forecast(e, "--out", str(TINY_BASE / "preds.csv")), 2,
     "tiny-cogvideox"),
    ("gwm-forecast-out-equals-plot", lambda e: _gwm_forecast(
        e, "--out", str(e.tmp / "p.csv"), "--plot", str(e.tmp / "p.csv")), 2, "--plot"),
    ("gwm-forecast-out-is-folder", lambda e: _gwm_forecast(e, "--out", str(e.tmp)), 2, "folder"),
    ("gwm-forecast-out-missing-folder", lambda e: _gwm_forecast(e, "--out", str(e.tmp / "nope" / "p.csv")), 2,
     "nope"),
    ("gwm-forecast-out-unwritable-folder", lambda e: _gwm_forecast(e, "--out", "/proc/preds.csv"), 2,
     "not writable"),
    ("gwm-evaluate-json-is-data", lambda e: ["gwm", "evaluate", *_gwm_inputs(e), "--holdout", "2",
                                             "--json", str(e.data)], 2, "--json"),
    ("gwm-evaluate-plot-in-adapter", lambda e: ["gwm", "evaluate", *_gwm_inputs(e), "--holdout", "2",
                                                "--plot", str(e.out / "a" / "x.png")], 2, "--plot"),
    ("gwm-plot-losses-out-in-run", lambda e: ["gwm", "plot-losses", str(e.out), "--out", str(e.out / "l.png")], 2,
     "--out"),
    ("gwm-forecast-horizon-over-limit", lambda e: ["gwm", "forecast", *_gwm_inputs(e), "--horizon", "100000000",
                                                   "--out", str(e.tmp / "p.csv")], 2, "10000"),
    ("gwm-evaluate-holdout-over-limit", lambda e: ["gwm", "evaluate", *_gwm_inputs(e), "--holdout", "100000000"], 2,
     "10000"),
    ("gwm-forecast-nan-adapter", lambda e: _gwm_forecast(e, "--out", str(e.tmp / "p.csv"), adapter=_nan_adapter(e)),
     2, "--adapter"),
    ("api-forecast-nan-adapter", lambda e: lambda: forecast(
        GWMModel.from_pretrained(TINY_BASE, adapter=_nan_adapter(e)), _macro_history(e), 2), NonFiniteForecastError,
     "'default'"),
    ("api-history-grid-over-limit", lambda e: lambda: read_history(_macro_history(e), AdapterSpec.from_config(
        load_adapter_config(e.adapter(_drop_frequency))), freq="ns"), DataError, "'ns'"),
    ("cli-output-dir-is-config", lambda e: ["--output_dir", str(e.config), "--config", str(e.config)], 2,
     "--output_dir"),
    ("cli-output-dir-in-base", lambda e: ["--output_dir", str(TINY_BASE / "run"), "--config", str(e.config)], 2,
     "--base"),
    ("cli-output-dir-would-hold-data", lambda e: ["--output_dir", str(e.tmp / "new"), "--config", str(e.spec_with(
        lambda s: s["sources"]["co2"].update(path=str(_copy(DATA / "co2_mauna_loa_monthly.csv",
                                                                e.tmp / "new" / "b" / "co2.csv")))))], 2, "co2"),
    ("cli-output-dir-is-adapter", lambda e: ["--output_dir", str(e.out / "a"), "--config", str(e.config)], 2,
     "adapter folder"),
    ("cli-output-dir-inside-run", lambda e: ["--output_dir", str(e.out / "a" / "more"), "--config", str(e.config)], 2,
     "--output_dir"),
    ("cli-max-steps-over-limit", lambda e: _train_node_j(e, "--max_steps", "100000000000"), 2, "--max_steps"),
    ("cli-max-steps-zero", lambda e: e.cli("--config", str(e.config), "--max_steps", "0"), 2, "--max_steps"),
    ("cli-accumulation-zero", lambda e: e.cli("--config", str(e.config), "--gradient_accumulation_steps", "0"), 2,
     "--gradient_accumulation_steps"),
    ("yaml-steps-over-limit", lambda e: lambda: load_curriculum(e.spec_with(
        lambda s: s["defaults"].update(steps=10**12))), CurriculumError, "steps"),
    ("yaml-batch-size-over-limit", lambda e: lambda: load_curriculum(e.spec_with(
        lambda s: s["nodes"][0].update(batch_size=10**9))), CurriculumError, "batch_size"),
    ("yaml-context-len-over-limit", lambda e: lambda: load_curriculum(e.spec_with(
        lambda s: s["defaults"].update(context_len=10**7))), CurriculumError, "context_len"),
    ("gwm-params-d-model-over-limit", lambda e: ["gwm", "params", "--architecture", "THUDM/CogVideoX-2b",
                                                 "--d_model", "100000000"], 2, "--d_model"),
    # ------------------------------------------------ end of badcli's block
    # ------------------------------------------------ bad20 (issue 20): writes stay in the output folder; no hang, no
    # unbounded memory; nothing silently wrong; one line instead of a traceback; the right culprit named
    ("cli-node-folder-linked-outside", lambda e: _train_node_j(e) if _link(e.out / "j", _notes(e)) else None, 2,
     "is a symbolic link"),
    ("cli-node-folder-linked-into-base", lambda e: _train_node_j(e) if _link(e.out / "j", TINY_BASE / "transformer")
     else None, 2, "/j is a symbolic link"),
    ("cli-final-linked-outside", lambda e: _train_node_j(e) if _link(e.out / "final", _notes(e)) else None, 2,
     "/final is a symbolic link"),
    ("cli-node-file-linked-outside", lambda e: _train_node_j(e) if _link(_mkdir(e.out / "j") / "README.md",
                                                                         _notes(e) / "README.md") else None, 2,
     "README.md is a symbolic link"),
    ("cli-lock-file-hard-linked-outside", lambda e: _train_node_j(e) if os.link(
        _notes(e) / "README.md", _mkdir(e.out / ".locks") / "j.lock") is None else None, 2, "j.lock is a hard link"),
    ("yaml-alias-bomb-in-unit", lambda e: lambda: load_curriculum(e.yaml(_alias_bomb(
        "sources:\n  co2:\n    path: x.csv\n    fields:\n      c: {column: co2, unit: *l8}\n"))), CurriculumError,
     "bad.yaml: not valid YAML (its anchors and aliases expand to more than 1,000,000 values"),
    ("yaml-alias-bomb-in-description", lambda e: lambda: load_curriculum(e.yaml(_alias_bomb(
        "nodes:\n  - {name: a, description: *l8}\n"))), CurriculumError, "expand to more than 1,000,000"),
    ("yaml-recursive-alias", lambda e: lambda: load_curriculum(e.yaml("nodes: &n [{name: a, sources: *n}]\n")),
     CurriculumError, "refers to its own anchor"),
    ("yaml-over-size-limit", lambda e: lambda: load_curriculum(_link(e.tmp / "zero.yaml", Path("/dev/zero"))),
     CurriculumError, "larger than 16 MiB"),
    ("gwm-adapter-config-linked-to-dev-zero", lambda e: _gwm_forecast(
        e, "--out", str(e.tmp / "p.csv"), adapter=e.adapter(_config_to_dev_zero)), 2,
     "adapter_config.json is larger than 16 MiB"),
    ("adapter-config-time-steps-times-width", lambda e: lambda: GWMModel.from_pretrained(TINY_BASE, adapter=e.adapter(
        lambda f: _edit_json(f / "adapter_config.json", lambda c: c["gwm_config"].update(
            max_time_steps=1_000_000, d_model=16_384)))), AdapterLoadError, "max_time_steps × d_model"),
    ("yaml-model-d-model-over-limit", lambda e: lambda: load_curriculum(e.spec_with(
        lambda s: s["model"].update(d_model=10**9))), CurriculumError, "model: d_model 1000000000 is over the limit"),
    ("yaml-model-scratch-layers-over-limit", lambda e: lambda: load_curriculum(e.spec_with(
        lambda s: s["model"].update(scratch_num_layers=10**7))), CurriculumError, "scratch_num_layers 10000000"),
    ("yaml-model-max-fields-inf", lambda e: lambda: load_curriculum(e.yaml(yaml.safe_dump(spec()).replace(
        "seed: 0", "seed: 0\n  max_fields: 1.0e+400"))), CurriculumError, "max_fields must be a positive integer, "
     "got inf"),
    ("yaml-model-max-fields-abc", lambda e: lambda: load_curriculum(e.spec_with(
        lambda s: s["model"].update(max_fields="abc"))), CurriculumError, "max_fields must be a positive integer"),
    ("yaml-model-seed-abc", lambda e: lambda: load_curriculum(e.spec_with(lambda s: s["model"].update(seed="abc"))),
     CurriculumError, "model: seed must be an integer in [0, 4,294,967,295], got 'abc'"),
    ("yaml-model-seed-2-70", lambda e: lambda: load_curriculum(e.spec_with(lambda s: s["model"].update(seed=2**70))),
     CurriculumError, "model: seed must be an integer"),
    ("yaml-model-block-timestep-huge", lambda e: lambda: load_curriculum(e.spec_with(
        lambda s: s["model"].update(block_timestep=10**30))), CurriculumError, "block_timestep must be an integer"),
    ("yaml-model-block-timestep-abc", lambda e: lambda: load_curriculum(e.spec_with(
        lambda s: s["model"].update(block_timestep="abc"))), CurriculumError, "block_timestep must be an integer"),
    ("cli-seed-2-70", lambda e: e.cli("--config", str(e.config), "--resume", "--seed", str(2**70)), 2, "--seed"),
    ("yaml-source-field-twice", lambda e: lambda: load_curriculum(e.yaml(_spec_text(
        "macro.us.inflation: infl\n", "macro.us.inflation: infl\n      macro.us.inflation: unemp\n"))),
     CurriculumError, "columns 'infl' and 'unemp' are both mapped to field 'macro.us.inflation'"),
    ("yaml-key-twice-in-node", lambda e: lambda: load_curriculum(e.yaml(_spec_text(
        "- name: b\n", "- name: b\n  steps: 3\n  steps: 5\n"))), CurriculumError, "key 'steps' is given twice"),
    ("gwm-forecast-columns-one-column-twice", lambda e: _gwm_forecast(
        e, "--columns", "unemp=macro.us.inflation", "--out", str(e.tmp / "p.csv")), 2,
     "--columns maps column 'unemp' to 'macro.us.unemployment' and to 'macro.us.inflation'"),
    ("gwm-forecast-columns-two-columns-one-field", lambda e: [
        "gwm", "forecast", "--adapter", str(e.out / "a"), "--data", str(e.data), "--columns", "unemp=X,infl=X",
        "--horizon", "2", "--out", str(e.tmp / "p.csv")], 2,
     "--columns maps columns 'unemp' and 'infl' both to field 'X'"),
    ("data-csv-header-column-twice", lambda e: lambda: _source(e.csv("date,value,value\n2000-01-01,1,2\n")).read(),
     DataError, "column name(s) ['value'] appear more than once"),
    ("cli-finished-node-from-another-job-other-lr", lambda e: _other_run(
        e, lambda run: _edit_json(run / "b" / "metrics.json", lambda m: m["config"].update(learning_rate=0.05))), 2,
     "node 'b' was trained in"),
    ("cli-resume-finished-adapter-damaged", lambda e: _other_run(e, lambda run: _flip_last_byte(
        run / "a" / "adapter_model.safetensors"), "--resume"), 2, "is not the adapter the node wrote"),
    ("cli-resume-finished-adapter-truncated", lambda e: _other_run(e, lambda run: _truncate(
        run / "a" / "adapter_model.safetensors"), "--resume"), 2, "adapter_model.safetensors is not the adapter"),
    ("cli-resume-finished-metrics-deleted", lambda e: _other_run(e, lambda run: (run / "a" / "metrics.json").unlink(),
                                                                 "--resume"), 2, "COMPLETE to train the node again"),
    ("cli-resume-old-run-truncated-parent", lambda e: _other_run(e, _old_run_truncated_a, "--resume"), 2,
     "node 'a': its adapter"),
    ("cli-resume-checkpoint-negative-step", lambda e: _resume_damaged_j(e, lambda c: _edit_json(
        c / "trainer_state.json", lambda t: t.update(step=-50))), 2,
     "trainer_state.json: step must be an integer in [0, 2], got -50"),
    ("cli-resume-checkpoint-adapter-truncated", lambda e: _resume_damaged_j(
        e, lambda c: _truncate(c / "adapter.safetensors")), 2, "checkpoint in"),
    ("cli-resume-checkpoint-optimizer-truncated", lambda e: _resume_damaged_j(
        e, lambda c: _truncate(c / "optimizer.safetensors")), 2, "is damaged"),
    ("adapter-weights-int64", lambda e: lambda: GWMModel.from_pretrained(TINY_BASE, adapter=e.adapter(
        lambda f: _edit_weights(f, lambda w: w.update({k: v.to(torch.int64) for k, v in w.items()})))),
     AdapterMismatchError, "has dtype I64"),
    ("gwm-plot-losses-metrics-wrong-types", lambda e: _plot_losses_of_copy(e, lambda m: m.update(
        history=[{"step": "one", "train_loss": [1]}])), 2, "a/metrics.json: history holds a step"),
    ("yaml-merge-density-string", lambda e: lambda: load_curriculum(e.spec_with(lambda s: s["nodes"][2].update(
        merge={"method": "ties", "density": "0.5"}))), CurriculumError, "node 'j': merge density must be in (0, 1]"),
    ("yaml-parents-nested-list", lambda e: lambda: load_curriculum(e.spec_with(lambda s: s["nodes"][2].update(
        parents=[["a"], "b"]))), CurriculumError, "node 'j': parents must be a list of names, got [['a'], 'b']"),
    ("yaml-sources-of-mappings", lambda e: lambda: load_curriculum(e.spec_with(lambda s: s["nodes"][0].update(
        sources=[{"x": 1}]))), CurriculumError, "node 'a': sources must be a list of names"),
    ("yaml-node-fields-number", lambda e: lambda: load_curriculum(e.spec_with(lambda s: s["nodes"][0].update(
        fields=5))), CurriculumError, "node 'a': fields must be a list of names, got 5"),
    ("yaml-node-description-mapping", lambda e: lambda: load_curriculum(e.spec_with(lambda s: s["nodes"][0].update(
        description={"x": 1}))), CurriculumError, "node 'a': description must be a string"),
    ("yaml-time-column-list", lambda e: lambda: load_curriculum(e.spec_with(lambda s: s["sources"]["co2"].update(
        time_column=["date"]))), CurriculumError, "source 'co2': time_column must be a string, got ['date']"),
    ("yaml-frequency-zero", lambda e: lambda: load_curriculum(e.spec_with(lambda s: s["sources"]["co2"].update(
        frequency="0D"))), CurriculumError, "source 'co2': frequency '0D' is not a pandas offset alias of a positive"),
    ("yaml-frequency-negative", lambda e: lambda: load_curriculum(e.spec_with(lambda s: s["sources"]["co2"].update(
        frequency="-1MS"))), CurriculumError, "source 'co2': frequency '-1MS'"),
    ("yaml-merge-weights-overflow", lambda e: lambda: load_curriculum(e.spec_with(lambda s: s["nodes"][2].update(
        merge={"method": "linear", "weights": [1e308, 1e308]}))), CurriculumError, "node 'j': merge weights"),
    ("adapter-field-frequency-zero", lambda e: lambda: GWMModel.from_pretrained(TINY_BASE, adapter=e.adapter(
        lambda f: _edit_field(f, frequency="0D"))), AdapterLoadError, "adapter_config.json: fields[0] its grid: "
     "frequency '0D'"),
    ("adapter-field-frequency-bogus", lambda e: lambda: GWMModel.from_pretrained(TINY_BASE, adapter=e.adapter(
        lambda f: _edit_field(f, frequency="bogus"))), AdapterLoadError, "adapter_config.json: fields[0]"),
    ("adapter-field-frequency-negative", lambda e: lambda: GWMModel.from_pretrained(TINY_BASE, adapter=e.adapter(
        lambda f: _edit_field(f, frequency="-1QS"))), AdapterLoadError, "frequency '-1QS'"),
    ("adapter-field-frequency-number", lambda e: lambda: GWMModel.from_pretrained(TINY_BASE, adapter=e.adapter(
        lambda f: _edit_field(f, frequency=5))), AdapterLoadError, "adapter_config.json: fields[0] its grid: "
     "frequency 5"),
    ("adapter-field-std-subnormal", lambda e: lambda: GWMModel.from_pretrained(TINY_BASE, adapter=e.adapter(
        lambda f: _edit_field(f, std=1e-320))), AdapterLoadError, "adapter_config.json: fields[0] std 1e-320"),
    ("adapter-format-version-string", lambda e: lambda: GWMModel.from_pretrained(TINY_BASE, adapter=e.adapter(
        lambda f: _edit_json(f / "adapter_config.json", lambda c: c.update(format_version="2")))), AdapterLoadError,
     "adapter_config.json: format_version must be the integer 3, got '2'"),
    ("api-history-value-1e300", lambda e: lambda: forecast(GWMModel.from_pretrained(TINY_BASE, adapter=e.out / "a"),
                                                           _macro_history(e).assign(**{"macro.us.unemployment": [
                                                               1e300] + [5.0] * (len(_macro_history(e)) - 1)}), 2),
     DataError, "field 'macro.us.unemployment': value 1e+300 lies"),
    ("data-years-before-pandas-dates", lambda e: lambda: _source(e.csv("date,value\n1500,1\n1501,2\n")).read(),
     DataError, "source 'src', column 'date': years 1500-1501 reach outside the dates pandas can hold"),
    ("api-predict-df-list-ids", lambda e: lambda: GWMModel.from_pretrained(TINY_BASE, adapter=e.out / "a").predict_df(
        _macro_history(e).assign(item_id=[["x"]] * len(_macro_history(e))), timestamp_column="date"), DataError,
     "column 'item_id': ids must be strings or numbers"),
    ("yaml-node-name-trailing-newline", lambda e: lambda: load_curriculum(e.spec_with(
        lambda s: s["nodes"][0].update(name="a\n"))), CurriculumError, "node name 'a\\n' is not a safe folder name"),
]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "dag.json" and ".locks" not in p.parts}  # lock files hold the last pid


def _assert_unchanged(env: Env, before: dict[str, bytes]) -> None:
    after = _snapshot(env.out)
    assert {k: v for k, v in after.items() if k in before} == before, "an earlier output was changed or removed"
    dag = json.loads((env.out / "dag.json").read_text())
    assert dag["nodes"]["a"]["status"] == dag["nodes"]["b"]["status"] == "done"


def _one_line(message: str, culprit: str) -> None:
    assert "\n" not in message.strip(), message
    assert "Traceback" not in message
    assert culprit in message, f"{culprit!r} not named in: {message}"


def _holds_year_1500() -> bool:
    """pandas 3 parses whole years into microsecond datetimes (years 1-9999); pandas 2 only into nanoseconds."""
    try:
        pd.to_datetime(pd.Series(["1500"]), format="%Y")
        return True
    except (ValueError, OverflowError):
        return False


_WIDE_DATES = _holds_year_1500()


@pytest.mark.parametrize(("build", "expected", "culprit"), [
    pytest.param(*c[1:], id=c[0], marks=pytest.mark.skipif(
        c[0] == "data-years-before-pandas-dates" and _WIDE_DATES,
        reason="this pandas holds the year 1500: test_years_before_1678_are_read_where_pandas_holds_them"))
    for c in CASES])
def test_bad_input(tmp_path, trained, capsys, build, expected, culprit):
    env = Env(tmp_path, trained)
    before = _snapshot(env.out)
    action = build(env)
    before_inputs = _snapshot(env.tmp)  # the user's own files next to the run (data, curriculum) stay too
    if expected == 2:
        run = dag_train.main
        if action[0] == "gwm":  # a `gwm` command line: modeling_gwm.commands.main
            run, action = commands.main, action[1:]
        try:
            rc = run(action)
        except SystemExit as exit_:  # argparse's own usage errors
            rc = exit_.code
        err = capsys.readouterr().err
        assert rc == 2
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if "error:" in line]
        assert len(lines) == 1, err
        _one_line(lines[0], culprit)
    else:
        with pytest.raises(expected) as caught:
            action()
        _one_line(str(caught.value), culprit)
    _assert_unchanged(env, before)
    after_inputs = _snapshot(env.tmp)
    assert {k: v for k, v in after_inputs.items() if k in before_inputs} == before_inputs, "an input was changed"


# ---------------------------------------------------------------------------------------------------- real processes
def _subprocess(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **kwargs.pop("env", {})}
    return subprocess.run([sys.executable, str(DAG_TRAIN), *argv], env=env, capture_output=True, text=True,
                          timeout=300, **kwargs)


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))  # any file past 8 KiB fails with EFBIG (disk full)


def test_full_disk_is_one_clean_line_and_keeps_earlier_outputs(tmp_path, trained):
    env = Env(tmp_path, trained)
    before = _snapshot(env.out)
    proc = _subprocess(_train_node_j(env), preexec_fn=_limit_file_size)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "File too large" in lines[0] and "node 'j'" in lines[0], proc.stderr[-3000:]
    assert not (env.out / "j" / "COMPLETE").exists()
    _assert_unchanged(env, before)


def test_read_only_output_directory_is_one_clean_line(tmp_path, trained):
    """Root ignores file modes, so as root the run's files are made immutable (chattr +i) instead of chmod 555."""
    env = Env(tmp_path, trained)
    before = _snapshot(env.out)
    paths = [env.out, *env.out.rglob("*")]
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "-R", "+i", str(env.out)], capture_output=True).returncode != 0:
            pytest.skip("running as root on a file system without chattr +i: cannot make a directory read-only")
    else:
        for path in paths:
            path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        proc = _subprocess(_train_node_j(env))
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-R", "-i", str(env.out)], check=True)
        for path in paths:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and str(env.out) in lines[0], proc.stderr[-3000:]
    assert "Permission denied" in lines[0] or "Operation not permitted" in lines[0], lines[0]
    _assert_unchanged(env, before)


def test_a_long_chain_plans_in_linear_time(tmp_path):
    """A 1,000-node fork chain: loading, checking and `--dry_run` take well under a second each (no n³ order)."""
    import time

    s = spec()
    s["nodes"] = [{"name": "n0", "sources": ["co2"]}] + [
        {"name": f"n{i}", "parents": [f"n{i - 1}"], "sources": ["co2"]} for i in range(1, 1000)]
    config = tmp_path / "chain.yaml"
    config.write_text(yaml.safe_dump(s))
    started = time.perf_counter()
    assert dag_train.main(["--config", str(config), "--dry_run"]) == 0
    curriculum = load_curriculum(config)
    assert curriculum.order()[-1] == "n999" and len(curriculum.ancestors("n999")) == 999
    assert time.perf_counter() - started < 20  # 34.7 s for 400 nodes before; about 1 s now on a loaded CI core


# ---------------------------------------------------------------------------------------------------- baddata block
# Helpers of the baddata cases above, and the checks that need more than one line of outcome.
def _edit_weights(folder: Path, edit) -> None:
    weights = load_file(folder / "adapter_model.safetensors")
    edit(weights)
    save_file(weights, str(folder / "adapter_model.safetensors"))


def _codec_key(weights: dict) -> str:
    return next(k for k in sorted(weights) if ".codec." in k and weights[k].dim() == 2)


def _run_copy(env: Env, dag_text: str) -> list[str]:
    """A copy of the run whose dag.json holds `dag_text` (the matrix checks the original run stays intact)."""
    run = env.tmp / "run2"
    shutil.copytree(env.out, run)
    (run / "dag.json").write_text(dag_text)
    return ["--output_dir", str(run), "--config", str(env.config), "--resume", "--nodes", "j", "--max_steps", "1"]


def _half_train_j(env: Env) -> None:
    """Node j stopped by a real NaN at step 2 of 2: its step-1 checkpoint (and the settings it started with) stay."""
    with pytest.raises(NonFiniteError):
        DAGCurriculumTrainer(curriculum=load_curriculum(env.config), output_dir=str(env.out), only_nodes=["j"],
                             resume=True, write_cards=False, callbacks=[FaultInjectionCallback(nan_at="j:2")]).run()
    assert (env.out / "j" / "checkpoint" / "trainer_state.json").is_file()


def _resume_j(env: Env, edit, *extra: str, half_trained: bool = False) -> list[str]:
    if half_trained:
        _half_train_j(env)
    s = spec()
    edit(s)
    config = env.yaml(yaml.safe_dump(s, sort_keys=False))  # sorted keys would reorder the fields: a change too
    return env.cli("--config", str(config), "--resume", "--nodes", "j", *extra)


def _resume_damaged_j(env: Env, edit) -> list[str]:
    """Node j half-trained, its checkpoint folder changed by `edit(folder)`, then resumed."""
    _half_train_j(env)
    edit(env.out / "j" / "checkpoint")
    return _resume_j(env, lambda s: None)


def _add_sunspots_to_a(s: dict) -> None:
    s["sources"]["sun"] = {"path": str(DATA / "sunspots_yearly.csv"), "frequency": "YS",
                           "fields": {"solar.sunspots.yearly": "sunactivity"}}
    s["nodes"][0]["sources"] = ["us_macro", "sun"]


def test_resume_with_allow_changed_config_trains_with_the_new_learning_rate(tmp_path, trained):
    """The optimizer and scheduler states of a checkpoint hold the old rate; with the override the new one must
    really apply (step 2 of 2 is the cosine schedule's first step after its one warm-up step: the full rate)."""
    last_step_loss = {}
    for lr in (0.005, 0.05):
        env = Env(tmp_path / str(lr), trained)
        _half_train_j(env)
        s = spec()
        s["nodes"][2]["learning_rate"] = lr
        config = env.yaml(yaml.safe_dump(s, sort_keys=False))
        assert dag_train.main(env.cli("--config", str(config), "--resume", "--nodes", "j",
                                      "--allow_changed_config")) == 0
        metrics = json.loads((env.out / "j" / "metrics.json").read_text())
        assert metrics["config"]["learning_rate"] == lr and metrics["history"][-1]["learning_rate"] == lr
        last_step_loss[lr] = metrics["val_loss_end"]  # the state after step 2 (the node writes its best state)
    assert last_step_loss[0.005] != last_step_loss[0.05]


def test_offsets_are_kept_as_local_time_in_training_and_forecasting(tmp_path, caplog):
    from modeling_gwm.tabular import to_frame

    months = [f"{2000 + i // 12}-{i % 12 + 1:02d}-01T00:00:00+05:00" for i in range(36)]
    path = tmp_path / "tz.csv"
    path.write_text("date,value\n" + "".join(f"{m},{i}\n" for i, m in enumerate(months)))
    frame = _source(path).read()
    assert len(frame) == 36 and frame.index[0] == pd.Timestamp("2000-01-01") and frame["x.value"].tolist() == \
        list(range(36))  # converted to UTC, 2000-01-01T00:00+05:00 would be 1999-12-31 19:00
    table = to_frame(pd.read_csv(path))
    assert list(table.index) == list(frame.index)
    path.write_text("date,value\n2000-01-01,1\n2000-01-15,2\n2000-02-01,3\n")
    with caplog.at_level("WARNING", logger="modeling_gwm.model.data"):
        DataSource.from_dict("src", {"path": str(path), "frequency": "MS", "fields": {"x": "value"}}).read()
    assert any(r.levelname == "WARNING" and "source 'src', column 'date': 3 rows" in r.getMessage()
               for r in caplog.records), caplog.text


def test_tiny_values_train_as_the_series_they_are(tmp_path):
    values = 2e-300 + 1e-300 * np.sin(np.arange(60))
    path = tmp_path / "tiny.csv"
    path.write_text("date,value\n" + "".join(f"{2000 + i // 12}-{i % 12 + 1:02d}-01,{float(v)!r}\n"
                                              for i, v in enumerate(values)))
    data = build_node_data([_source(path)], None, context_len=12)
    stats = data.stats["x.value"]
    assert stats.std == pytest.approx(np.std(values[:48] / 1e-300) * 1e-300, rel=1e-9)  # not 0 -> not 1.0
    train = data.train.values[data.train.presence]
    assert 0.9 < float(train.std()) < 1.1  # unit spread in the model's units, not a constant


@pytest.mark.parametrize("backbone", ["cogvideox", "scratch"])
def test_expected_adapter_tensors_are_what_peft_saves(backbone):
    """The weights check derives its expectation from the built model: it must equal PEFT's own state dict."""
    from peft import get_peft_model, get_peft_model_state_dict

    from modeling_gwm.model.adapter_files import expected_adapter_shapes
    from modeling_gwm.model.loop import LoopConfig

    kwargs = {"d_model": 16, "backbone": backbone, "scratch_num_layers": 2}
    config = LoopConfig(n_loops=2, fields=[{"name": "x", "mean": 0.0, "std": 1.0}])
    peft_model = get_peft_model(GWMModel.from_pretrained(TINY_BASE, **kwargs), config)
    saved = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    expected = expected_adapter_shapes(GWMModel.from_pretrained(TINY_BASE, **kwargs), peft_model.peft_config[
        "default"], "adapter")
    assert saved == expected
# ---------------------------------------------------------------------------------------------------- badcli: processes
def test_full_disk_during_gwm_output_leaves_the_earlier_file_whole(tmp_path, trained):
    """An output written when the disk fills (RLIMIT_FSIZE) fails with one line and the old file stays whole."""
    env = Env(tmp_path, trained)
    old = tmp_path / "preds.png"
    old.write_bytes(b"an earlier plot the user keeps")
    argv = [sys.executable, "-m", "modeling_gwm.commands", "forecast", *_gwm_inputs(env), "--horizon", "2",
            "--out", str(tmp_path / "preds.csv"), "--plot", str(old)]  # the CSV fits in 8 KiB, the PNG does not
    proc = subprocess.run(argv, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("gwm forecast: error: --plot") and "File too large" in last, last
    assert old.read_bytes() == b"an earlier plot the user keeps"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "a temporary file was left behind"


def test_accelerate_launch_quiet_ends_with_the_one_line_error(tmp_path):
    """The README's `accelerate launch -q`: the launcher exits 1 and the script's error line is the last one."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [a, b\n")
    argv = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "-q", "--num_processes", "1",
            str(DAG_TRAIN), "--config", str(bad), "--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(argv, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]  # accelerate's own code for any failure of the script
    assert "Traceback" not in proc.stderr and "CalledProcessError" not in proc.stderr
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("dag_train.py: error: ") and "bad.yaml" in last, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------- bad20: held
def test_a_node_records_its_adapter_checksum_and_the_base_it_was_trained_on(tmp_path, trained, caplog):
    """metrics.json holds the adapter's SHA-256 (weights changed since: a warning at load); the adapter holds a sample
    of its base's weights, so another base of the same shapes (other seed) loads with a warning, the own base (also
    in bf16) without one."""
    import hashlib

    env = Env(tmp_path, trained)
    metrics = json.loads((env.out / "a" / "metrics.json").read_text())
    assert metrics["adapter_sha256"] == hashlib.sha256((env.out / "a" / "adapter_model.safetensors").read_bytes()
                                                       ).hexdigest()
    assert len(load_adapter_config(env.out / "a").base_weights) == 32
    other = make_tiny_cogvideox(tmp_path / "other-base", seed=1)
    for base, kwargs, warned in ((TINY_BASE, {}, False), (TINY_BASE, {"frozen_dtype": "bfloat16"}, False),
                                 (other, {}, True)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="modeling_gwm.model.adapter_files"):
            GWMModel.from_pretrained(base, adapter=env.out / "a", **kwargs)
        assert any("trained on a base with other weights" in r.getMessage() for r in caplog.records) == warned, base
    changed = env.adapter(lambda f: _flip_last_byte(f / "adapter_model.safetensors"))  # loads: shapes still fit
    caplog.clear()
    with caplog.at_level("WARNING", logger="modeling_gwm.model.adapter_files"):
        GWMModel.from_pretrained(TINY_BASE, adapter=changed)
    assert any("are not the ones its metrics.json recorded" in r.getMessage() for r in caplog.records), caplog.text


def test_a_full_disk_leaves_no_checkpoint_staging_folder(tmp_path):
    """Disk full (RLIMIT_FSIZE: EFBIG, which Python gets as an error, not a signal) while a checkpoint is written:
    one OSError naming the node, the previous checkpoint untouched, no `.checkpoint.tmp` left behind."""
    from modeling_gwm.training import checkpoint

    folder = tmp_path / "node" / "checkpoint"
    weight = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.ones(4)
    optimizer.step()
    checkpoint.save(folder, "node", checkpoint.NodeState(step=1), {"w": weight.detach()}, optimizer, {})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, hard))
    try:
        with pytest.raises(OSError, match="node 'node'"):
            checkpoint.save(folder, "node", checkpoint.NodeState(step=2), {"w": torch.zeros(100_000)}, optimizer, {})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert not (tmp_path / "node" / ".checkpoint.tmp").exists()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_model_limits_are_the_ones_gwm_params_uses():
    from modeling_gwm.model.configuration_gwm import MODEL_LIMITS

    assert commands.PARAMS_LIMITS["d_model"] == MODEL_LIMITS["d_model"]


def test_forecast_quantiles_without_the_median_writes_those_levels(tmp_path, trained):
    """`--quantiles 0.9 0.1`: the median is computed for the point forecast and the plot, the CSV has the levels asked
    for (any order), with and without --plot."""
    env = Env(tmp_path, trained)
    for plot in ([], ["--plot", str(tmp_path / "p.png")]):
        out = tmp_path / "q.csv"
        assert commands.main(_gwm_forecast(env, "--out", str(out), "--quantiles", "0.9", "0.1", *plot)[1:]) == 0
        columns = pd.read_csv(out).columns
        assert sorted(c.split("@")[1] for c in columns if "@" in c) == ["0.1", "0.1", "0.9", "0.9"], list(columns)


def test_full_disk_at_the_card_names_the_node_and_folder(tmp_path, trained):
    """The adapter fits in 30,000 bytes, the card's loss plot does not: one line naming node j and its folder."""
    env = Env(tmp_path, trained)
    before = _snapshot(env.out)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))

    proc = _subprocess(_train_node_j(env), preexec_fn=limit)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "File too large" in lines[0], proc.stderr[-3000:]
    assert f"model card or loss plot of node 'j' in {env.out / 'j'}" in lines[0], lines[0]
    assert not (env.out / "j" / "COMPLETE").exists()
    _assert_unchanged(env, before)


@pytest.mark.skipif(not _WIDE_DATES, reason="this pandas holds nanosecond datetimes only (1678-2261): refused above")
def test_years_before_1678_are_read_where_pandas_holds_them(tmp_path):
    """On pandas 3 the years the bad-input case refuses on pandas 2 are simply dates."""
    csv = tmp_path / "old.csv"
    csv.write_text("date,value\n1500,1\n1501,2\n1502,3\n")
    frame = _source(csv).read()
    assert [t.year for t in frame.index] == [1500, 1501, 1502]
