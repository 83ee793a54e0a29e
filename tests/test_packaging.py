"""The package as users get it: a built wheel installed without `-e`, and a `gwm` CLI that starts fast.

The wheel test builds `modeling_gwm` with `pip wheel`, installs it in a fresh virtualenv that sees this environment's
dependencies (torch & co. through a `.pth` line, never this checkout or its editable install) and writes a model card
from there: `hub_cards` (the card templates and their rendering) must travel in the wheel as a package of its own.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _clean_env() -> dict[str, str]:
    """This environment without PYTHONPATH (which may point at the checkout) and offline for the Hub."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str], cwd: Path, timeout: int = 300) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A one-node run folder as the trainer leaves it: a real loop adapter on the tiny base, metrics, dag.json."""
    from peft import get_peft_model

    from modeling_gwm import GWMModel, LoopConfig
    from modeling_gwm.model.base import TINY_BASE_PATH

    out = tmp_path_factory.mktemp("run")
    fields = [dict(name="climate.enso.nino12_sst", mean=23.0, std=2.0, transform="none", unit="degC")]
    model = get_peft_model(GWMModel.from_pretrained(TINY_BASE_PATH, d_model=32), LoopConfig(n_loops=2, fields=fields),
                           adapter_name="climate")
    model.save_pretrained(str(out), selected_adapters=["climate"])  # -> out/climate/adapter_*
    history = [{"step": s, "train_loss": 1.0 / s} for s in range(1, 11)]
    (out / "climate" / "metrics.json").write_text(json.dumps(dict(
        node="climate", steps=10, train_loss_start=1.0, train_loss_end=0.1, val_loss_start=1.2, val_loss_end=0.3,
        wall_time_s=1.0, n_loops=2, fields=[fields[0]["name"]], history=history,
        val_history=[{"step": 0, "val_loss": 1.2}, {"step": 10, "val_loss": 0.3}])))
    (out / "dag.json").write_text(json.dumps({
        "curriculum": "demo.yaml", "order": ["climate"], "base": "THUDM/CogVideoX-2b", "seed": 0,
        "nodes": {"climate": {"status": "done", "parents": [], "merge": None, "output": "climate"}}}))
    return out


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(venv folder, its site-packages, the wheel): the package built with `pip wheel` and installed without `-e`."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the sources, so setuptools' build/ and egg-info never land in the checkout.
    src = tmp_path / "src"
    for package in ("modeling_gwm", "hub_cards"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "configuration", src / "configuration")  # mapped to modeling_gwm/configuration/
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    # setuptools already here: build without downloading it (else pip fetches it from PyPI into an isolated env)
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-q", *isolation, "-w", str(tmp_path / "dist")],
         cwd=src)
    (wheel,) = (tmp_path / "dist").glob("modeling_gwm-*.whl")

    # A fresh venv that borrows this environment's dependencies: a .pth *line* adds the folder to sys.path without
    # running the .pth files in it, so the editable install of the checkout stays invisible.
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path)
                .strip())
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_outer_deps.pth").write_text("\n".join(sorted(outer)) + "\n")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel)], cwd=tmp_path)
    return env_dir, site, wheel


@pytest.mark.slow
def test_installed_wheel_writes_a_card(tmp_path, run_dir, installed_wheel):
    env_dir, site, wheel = installed_wheel
    python = env_dir / "bin" / "python"
    names = zipfile.ZipFile(wheel).namelist()
    assert {"hub_cards/__init__.py", "hub_cards/templates/adapter_card.md",
            "hub_cards/templates/curriculum_card.md"} <= set(names)
    sources = {path.relative_to(REPO).as_posix() for package in ("modeling_gwm", "hub_cards")
               for path in (REPO / package).rglob("*.py")}
    assert not sources - set(names), f"modules missing from the wheel: {sorted(sources - set(names))}"
    assert {"modeling_gwm/configuration/curricula/demo.yaml", "modeling_gwm/configuration/accelerate/cpu_2proc.yaml",
            "modeling_gwm/configuration/data/elnino_nino12_monthly.csv"} <= set(names)
    assert not [n for n in names if n.startswith(("configuration/", "tests/", "training/", "modeling_gwm/templates/"))]
    assert not [n for n in names if n.endswith(".safetensors")]  # the tiny base is written, not shipped

    script = f"""
import hub_cards, modeling_gwm, modeling_gwm.model.base as base
from modeling_gwm.hub.cards import write_node_card
print(modeling_gwm.__file__)
print(hub_cards.__file__)
write_node_card({str(run_dir)!r}, "climate")
try:
    base.load_cogvideox_base(base.TINY_BASE_PATH)
except base.BaseLoadError as err:
    print(err)
"""
    out = _run([str(python), "-I", "-c", script], cwd=tmp_path).splitlines()
    assert Path(out[0]).is_relative_to(site), f"modeling_gwm imported from {out[0]}, not from the installed wheel"
    assert Path(out[1]).is_relative_to(site), f"hub_cards imported from {out[1]}, not from the installed wheel"
    card = (run_dir / "climate" / "README.md").read_text()
    assert "# GWM adapter `climate`" in card and "climate.enso.nino12_sst" in card
    assert "make_tiny_cogvideox" in out[-1]  # no tiny base next to an installed package: one sentence says where
    assert "usage: gwm" in _run([str(env_dir / "bin" / "gwm"), "--help"], cwd=tmp_path)


def test_cli_help_imports_no_heavy_library():
    """`gwm --help` and `gwm dag --help` parse arguments before torch & co. are imported (they took ~7 s before)."""
    heavy = ("torch", "transformers", "diffusers", "peft", "datasets", "matplotlib", "pandas", "accelerate")
    for argv in (["--help"], ["dag", "--help"]):
        script = ("import sys, contextlib, io\nfrom modeling_gwm.commands import main\n"
                  f"with contextlib.redirect_stdout(io.StringIO()):\n"
                  f"    try:\n        main({argv!r})\n    except SystemExit:\n        pass\n"
                  f"print([m for m in {heavy!r} if m in sys.modules])")
        out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                             env=os.environ | {"PYTHONPATH": str(REPO)})
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "[]", f"gwm {' '.join(argv)} imported {out.stdout.strip()}"


def test_training_off_a_terminal_logs_a_line_per_node_and_draws_no_bar(tmp_path, capfd, caplog, monkeypatch):
    """Under a launcher or `> log`, tqdm's redraws would fill the log: one start and one end line per node instead."""
    from _tiny import tiny_curriculum, write_curriculum

    from modeling_gwm.training.curriculum import load_curriculum
    from modeling_gwm.training.trainer import DAGCurriculumTrainer

    monkeypatch.delenv("GWM_PROGRESS", raising=False)
    spec = tiny_curriculum(steps=2, checkpoint_every=5)
    spec["nodes"] = spec["nodes"][:1]  # one root is enough
    caplog.set_level(logging.INFO, logger="modeling_gwm.training.trainer")
    DAGCurriculumTrainer(curriculum=load_curriculum(write_curriculum(tmp_path, spec)), output_dir=str(tmp_path / "out"),
                         device="cpu", write_cards=False).run()
    err = capfd.readouterr().err
    assert "\r" not in err and "it/s" not in err and "examples/s" not in err  # no tqdm, no datasets bar
    lines = [r.getMessage() for r in caplog.records if "node macro" in r.getMessage()]
    assert any("node macro [root]: training steps 1-2" in line for line in lines), lines
    assert any("node macro: done, train loss" in line and "val loss" in line for line in lines), lines


@pytest.mark.slow
def test_installed_wheel_writes_the_tiny_base_trains_forecasts_and_its_card_snippet_runs(tmp_path, installed_wheel):
    """What a user of the wheel does first, from a folder outside the repository: write the tiny base, train the
    shipped demo curriculum's first node on it with `gwm train`, forecast with `gwm forecast`, run the card's usage
    snippet (with the run folder standing in for the Hub repo)."""
    env_dir, site, _ = installed_wheel
    gwm, python = str(env_dir / "bin" / "gwm"), str(env_dir / "bin" / "python")
    _run([gwm, "make-tiny-base", "tiny"], cwd=tmp_path)
    written = tmp_path / "tiny" / "transformer"
    shipped = REPO / "configuration" / "tiny-cogvideox" / "transformer"
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):  # deterministic: the shipped checkpoint
        assert (written / name).read_bytes() == (shipped / name).read_bytes(), name

    _run([gwm, "train", "--base", "tiny", "--output_dir", "out", "--nodes", "climate", "--max_steps", "2"],
         cwd=tmp_path)
    assert (tmp_path / "out" / "climate" / "COMPLETE").is_file()
    config = json.loads((tmp_path / "out" / "climate" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == config["gwm_config"]["base_model_name_or_path"] == str(
        tmp_path / "tiny")  # absolute, though given as a relative path

    data = site / "modeling_gwm" / "configuration" / "data" / "elnino_nino12_monthly.csv"
    _run([gwm, "forecast", "--adapter", "out/climate", "--data", str(data), "--columns", "sst=climate.enso.nino12_sst",
          "--horizon", "6", "--out", "preds.csv"], cwd=tmp_path)
    assert len((tmp_path / "preds.csv").read_text().splitlines()) == 7  # header + 6 months

    card = (tmp_path / "out" / "climate" / "README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert "make_tiny_cogvideox" in snippet and "TINY_BASE_PATH" not in snippet
    snippet = snippet.replace('"<user>/<repo>"', repr(str(tmp_path / "out")))  # the run folder stands in for the Hub
    script = (f"import modeling_gwm\nassert {str(site)!r} in modeling_gwm.__file__\n{snippet}\n"
              "print(type(model).__name__)")
    run_at = tmp_path / "reader"
    run_at.mkdir()
    assert _run([python, "-I", "-c", script], cwd=run_at).strip().splitlines()[-1] == "PeftModel"
