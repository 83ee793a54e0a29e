"""Hub integration: model cards, loss plots, the upload plan, pushes at huggingface_hub's boundary, loading by Hub id.

CI has no network. Pushes are checked where our code hands over to `huggingface_hub` (`HfApi.create_repo` /
`create_commit`), and loading by Hub id goes through huggingface_hub's real download-and-cache code with
`HF_HUB_OFFLINE=1`, against a cache laid out exactly as huggingface_hub lays it out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants, scan_cache_dir
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.hf_api import CommitInfo
from peft import get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file

from modeling_gwm import GWMModel, LoopConfig
from modeling_gwm.hub.cards import write_node_card
from modeling_gwm.hub.hub import (
    HubOfflineError,
    download_adapter,
    plan_curriculum_upload,
    push_adapter,
    push_curriculum,
)
from modeling_gwm.model.base import TINY_BASE_PATH

FAKE_TOKEN = "hf_GWMtestTokenThatMustNeverLeak0123456789"
REPO = "gwm-user/demo-run"
FIELDS = {
    "macro": [dict(name="macro.us.real_gdp", mean=0.006, std=0.011, transform="pct_change", unit="% q/q")],
    "markets": [dict(name="markets.sp500.close", mean=7.2, std=0.9, transform="log", unit="USD")],
}
FIELDS["world"] = FIELDS["macro"] + FIELDS["markets"]
PARENTS = {"macro": [], "markets": [], "world": ["macro", "markets"]}
NODE_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md", "loss_curve.png", "metrics.json"}


def _metrics(node: str, steps: int = 30) -> dict:
    history = [{"step": s, "train_loss": 1.0 * math.exp(-s / 10) + 0.2} for s in range(1, steps + 1)]
    val_history = [{"step": s, "val_loss": 1.1 * math.exp(-s / 10) + 0.25} for s in (0, 15, 30)]
    sources = [{"name": f"{node}_source", "start": "2000-01-01", "end": "2019-12-31"}]
    if node == "macro":
        sources[0]["hub_dataset"] = "gwm-user/macro-panel"
    return dict(node=node, steps=steps, train_loss_start=history[0]["train_loss"],
                train_loss_end=history[-1]["train_loss"], val_loss_start=val_history[0]["val_loss"],
                val_loss_end=val_history[-1]["val_loss"], wall_time_s=1.5, trainable_params=0, n_loops=2,
                fields=[f["name"] for f in FIELDS[node]], sources=sources, history=history,
                val_history=val_history)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real run folder as the trainer leaves it: real adapters on the tiny base, metrics, dag.json, cards."""
    out = tmp_path_factory.mktemp("run")
    model = GWMModel.from_pretrained(TINY_BASE_PATH, d_model=32)
    dag = {"curriculum": "demo.yaml", "order": list(PARENTS), "base": TINY_BASE_PATH, "seed": 0,
           "nodes": {n: {"status": "pending", "parents": p, "merge": None, "retention": None, "output": n}
                     for n, p in PARENTS.items()}}
    peft_model = None
    for node, parents in PARENTS.items():
        config = LoopConfig(n_loops=2, fields=FIELDS[node])
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=node)
        else:
            peft_model.add_adapter(node, config)
        peft_model.save_pretrained(str(out), selected_adapters=[node])  # -> out/<node>/adapter_*
        (out / node / "metrics.json").write_text(json.dumps(_metrics(node)))
        dag["nodes"][node]["status"] = "done"
        if len(parents) > 1:
            dag["nodes"][node]["merge"] = {"method": "linear", "weights": [0.7, 0.3]}
            dag["nodes"][node]["retention"] = {"macro": {"parent_val_loss": 0.4, "merged_val_loss": 0.5},
                                               "markets": {"parent_val_loss": 0.3, "merged_val_loss": 0.33}}
        (out / "dag.json").write_text(json.dumps(dag))
        write_node_card(str(out), node)
    return out


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


class RecordingHub:
    """Stands in for the Hub at huggingface_hub's own boundary: records what `HfApi` was asked to do."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, dict]] = []
        self.tokens: list[str | None] = []
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            hub.tokens.append(api.token)
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def create_commit(api, repo_id, operations, **kwargs):
            hub.calls.append(("create_commit", {"repo_id": repo_id, "operations": list(operations), **kwargs}))
            hub.tokens.append(api.token)
            return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}",
                              commit_message=kwargs.get("commit_message", ""), commit_description="",
                              oid="0" * 40)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)

    def operations(self):
        return next(kwargs["operations"] for name, kwargs in self.calls if name == "create_commit")


def _all_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _populate_hub_cache(cache: Path, repo_id: str, operations) -> str:
    """Lay the planned files out as huggingface_hub's cache holds a downloaded snapshot (blobs, symlinks, refs)."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo_dir = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    for op in operations:
        data = op.path_or_fileobj if isinstance(op.path_or_fileobj, bytes) else Path(op.path_or_fileobj).read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = repo_dir / "snapshots" / commit / op.path_in_repo
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return commit


# ---------------------------------------------------------------------------------------------------- cards
def test_node_card_loads_back_with_every_metadata_field(run_dir):
    card = ModelCard.load(run_dir / "macro" / "README.md")
    data = card.data.to_dict()
    assert "base_model" not in data  # a local base (here the tiny one) is no Hub id: left out, never "tiny-cogvideox"
    assert data["library_name"] == "peft"
    assert data["pipeline_tag"] == "time-series-forecasting"
    assert {"gwm", "world-model", "cogvideox", "peft", "time-series"} <= set(data["tags"])
    assert data["datasets"] == ["gwm-user/macro-panel"]  # only Hub ids; the local sources stay in the body
    assert data["license"] == "apache-2.0"


def test_node_card_body_documents_fields_usage_budget_and_limitations(run_dir):
    text = (run_dir / "world" / "README.md").read_text()
    assert "| 0 | `macro.us.real_gdp` | % q/q | — | pct_change | 0.006 | 0.011 |" in text  # — : no own frequency
    assert "| 1 | `markets.sp500.close` | USD | — | log | 7.2 | 0.9 |" in text
    assert 'GWMModel.from_pretrained(base, "<user>/<repo>", subfolder="world")' in text
    trainable = sum(t.numel() for t in load_file(run_dir / "world" / "adapter_model.safetensors").values())
    assert f"| **Total trainable** | **{trainable:,}** | yes |" in text
    assert "Frozen CogVideoX blocks" in text
    limitations = text.split("## Limitations")[1]
    assert "`macro.us.real_gdp`" in limitations and "2000-01-01 – 2019-12-31" in limitations
    assert "| `markets` | 0.3 | 0.33 | +10.0 % |" in text  # join retention


def test_node_card_usage_forecasts_and_states_each_setting_once(run_dir):
    text = (run_dir / "world" / "README.md").read_text()
    usage = text.split("## Usage")[1].split("## Lineage")[0]
    assert "model.forecast(history, prediction_length=" in usage and "model.forecast_quantiles(" in usage
    assert "torch.zeros" not in usage and 'bands["macro.us.real_gdp", 0.9]' in usage
    assert text.count("context length") == 1 and text.count("context_len") == 0


def test_a_join_marks_the_fields_it_inherited_without_training_them(run_copy):
    metrics = json.loads((run_copy / "world" / "metrics.json").read_text())
    metrics["fields"] = ["markets.sp500.close"]  # the join trained on one of its two fields
    (run_copy / "world" / "metrics.json").write_text(json.dumps(metrics))
    write_node_card(str(run_copy), "world")
    text = (run_copy / "world" / "README.md").read_text()
    assert "| 0 | `macro.us.real_gdp` (inherited) |" in text and "| 1 | `markets.sp500.close` | USD |" in text
    limitations = text.split("## Limitations")[1]
    assert "Trained only on the 1 field listed above (`markets.sp500.close`)" in limitations


def test_a_join_without_recorded_retention_has_no_retention_heading(run_copy):
    dag = json.loads((run_copy / "dag.json").read_text())
    dag["nodes"]["world"]["retention"] = {"macro": None, "markets": {"parent_val_loss": None, "merged_val_loss": None}}
    (run_copy / "dag.json").write_text(json.dumps(dag))
    write_node_card(str(run_copy), "world")
    assert "Join retention" not in (run_copy / "world" / "README.md").read_text()


def test_a_hub_base_is_the_cards_base_model(run_copy):
    for node in ("macro",):
        config = json.loads((run_copy / node / "adapter_config.json").read_text())
        config["gwm_config"]["base_model_name_or_path"] = "THUDM/CogVideoX-2b"
        (run_copy / node / "adapter_config.json").write_text(json.dumps(config))
    write_node_card(str(run_copy), "macro")
    assert ModelCard.load(run_copy / "macro" / "README.md").data.base_model == "THUDM/CogVideoX-2b"


def test_the_runs_loss_plot_keeps_its_legend_off_the_curves(run_dir):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from modeling_gwm.plots import loss_curves_figure

    fig = loss_curves_figure(run_dir)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    ax, renderer = fig.axes[0], canvas.get_renderer()
    legend, plot_area = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend.x0 >= plot_area.x1  # right of the axes, not over them
    assert legend.x1 <= fig.bbox.x1 + 1  # and inside the figure


def test_join_lineage_names_both_parents_and_their_weights(run_dir):
    text = (run_dir / "world" / "README.md").read_text()
    mermaid = text.split("```mermaid\n")[1].split("```")[0]
    assert mermaid.startswith("graph TD")
    ids = {name: node_id for node_id, name in re.findall(r'(n\d+)\["([\w.-]+)<br/>', mermaid)}
    assert set(ids) == {"macro", "markets", "world"}
    assert f'{ids["macro"]} -- "linear 0.7" --> {ids["world"]}' in mermaid
    assert f'{ids["markets"]} -- "linear 0.3" --> {ids["world"]}' in mermaid


def test_every_node_folder_has_a_card_and_a_loss_plot(run_dir):
    import matplotlib.image

    for node in PARENTS:
        assert ModelCard.load(run_dir / node / "README.md").data.library_name == "peft"
        image = matplotlib.image.imread(run_dir / node / "loss_curve.png")
        assert image.shape[0] > 300 and image.shape[1] > 600
        assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas
    assert matplotlib.image.imread(run_dir / "loss_curves.png").shape[1] > 600
    assert "[`world`](world/README.md)" in (run_dir / "README.md").read_text()


def test_a_node_with_only_adapter_files_still_gets_a_card_and_plot(run_copy):
    (run_copy / "macro" / "metrics.json").unlink()
    (run_copy / "dag.json").unlink()
    write_node_card(str(run_copy), "macro")
    card = ModelCard.load(run_copy / "macro" / "README.md")
    assert card.data.pipeline_tag == "time-series-forecasting" and "`macro.us.real_gdp`" in card.text
    assert "No metrics were recorded" in card.text
    assert (run_copy / "macro" / "loss_curve.png").read_bytes().startswith(b"\x89PNG")


def test_malformed_metrics_file_is_named_in_the_error(run_copy):
    (run_copy / "macro" / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"macro/metrics\.json is not valid JSON"):
        write_node_card(str(run_copy), "macro")


# ---------------------------------------------------------------------------------------------------- upload plan
def test_plan_uploads_exactly_the_allow_listed_files(run_copy):
    (run_copy / "macro" / "checkpoint-10").mkdir()
    (run_copy / "macro" / "checkpoint-10" / "optimizer.bin").write_bytes(b"state")
    (run_copy / "macro" / "diffusion_pytorch_model.safetensors").write_bytes(b"frozen")
    (run_copy / "notes.txt").write_text("scratch")
    operations = plan_curriculum_upload(run_copy, repo_id=REPO)
    expected = {"README.md", "dag.json", "loss_curves.png"} | {f"{n}/{f}" for n in PARENTS for f in NODE_FILES}
    assert sorted(op.path_in_repo for op in operations) == sorted(expected)
    card = next(op for op in operations if op.path_in_repo == "world/README.md").path_or_fileobj.decode()
    assert f'GWMModel.from_pretrained(base, "{REPO}", subfolder="world")' in card
    assert f"https://huggingface.co/{REPO}/resolve/main/world/loss_curve.png" in card


@pytest.fixture
def hub_cache(run_dir, tmp_path, monkeypatch, offline) -> str:
    """The planned upload of the run, as huggingface_hub caches it after a download; offline. Returns the commit."""
    cache = tmp_path / "hf-cache"
    commit = _populate_hub_cache(cache, REPO, plan_curriculum_upload(run_dir, repo_id=REPO))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert [r.repo_id for r in scan_cache_dir(cache).repos] == [REPO]  # huggingface_hub accepts the layout
    return commit


def _assert_same_adapter(model, folder: Path) -> None:
    loaded = get_peft_model_state_dict(model)
    saved = load_file(folder / "adapter_model.safetensors")
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_planned_upload_loads_back_from_the_hub_cache_offline(run_dir, hub_cache):
    folder = download_adapter(REPO, subfolder="world")
    model = GWMModel.from_pretrained(TINY_BASE_PATH, folder)
    _assert_same_adapter(model, run_dir / "world")
    assert model.peft_config["default"].field_names == ["macro.us.real_gdp", "markets.sp500.close"]
    pinned = GWMModel.from_pretrained(TINY_BASE_PATH, download_adapter(REPO, subfolder="macro", revision=hub_cache))
    assert pinned.peft_config["default"].field_names == ["macro.us.real_gdp"]


def test_hub_id_with_subfolder_loads_from_the_cache_offline(run_dir, hub_cache):
    model = GWMModel.from_pretrained(TINY_BASE_PATH, REPO, subfolder="world")
    _assert_same_adapter(model, run_dir / "world")


def test_uncached_adapter_offline_says_what_to_do(tmp_path, monkeypatch, offline):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(HubOfflineError, match=r"gwm-user/never-downloaded \(subfolder world\) is not in the local "
                                               r"Hugging Face cache .* HF_HUB_OFFLINE is set"):
        download_adapter("gwm-user/never-downloaded", subfolder="world")
    with pytest.raises(OSError, match=r"gwm-user/never-downloaded.*subfolder world"):  # AdapterLoadError today
        GWMModel.from_pretrained(TINY_BASE_PATH, "gwm-user/never-downloaded", subfolder="world")


# ---------------------------------------------------------------------------------------------------- push
def test_push_curriculum_commits_the_plan_through_hfapi(run_dir, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub = RecordingHub(monkeypatch)
    url = push_curriculum(str(run_dir), REPO, token=FAKE_TOKEN, private=True)
    assert url.startswith(f"https://huggingface.co/{REPO}/commit/")
    assert [name for name, _ in hub.calls] == ["create_repo", "create_commit"]
    assert hub.calls[0][1]["private"] is True and hub.tokens == [FAKE_TOKEN, FAKE_TOKEN]
    planned = plan_curriculum_upload(run_dir, repo_id=REPO)
    assert [op.path_in_repo for op in hub.operations()] == [op.path_in_repo for op in planned]


def test_push_adapter_uploads_the_gwm_card_not_peft_generic_one(monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub = RecordingHub(monkeypatch)
    model = get_peft_model(GWMModel.from_pretrained(TINY_BASE_PATH, d_model=32),
                           LoopConfig(n_loops=2, fields=FIELDS["macro"]), adapter_name="solo")
    push_adapter(model, "gwm-user/solo", token=FAKE_TOKEN)
    operations = {op.path_in_repo: op for op in hub.operations()}
    assert set(operations) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    card = operations["README.md"].path_or_fileobj.decode()
    assert "# GWM adapter `solo`" in card and 'GWMModel.from_pretrained(base, "gwm-user/solo")' in card
    assert "library_name: peft" in card and "`macro.us.real_gdp` | % q/q" in card


def test_push_offline_says_so_and_leaves_local_files_untouched(run_copy, offline):
    before = _all_bytes(run_copy)
    with pytest.raises(HubOfflineError) as err:
        push_curriculum(str(run_copy), REPO, token=FAKE_TOKEN)
    message = str(err.value)
    assert "offline" in message and str(run_copy) in message and "untouched" in message and "gwm push" in message
    assert _all_bytes(run_copy) == before


def test_push_without_network_says_so(run_copy, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with socket.socket() as s:  # a port nothing listens on: the real HfApi gets "connection refused"
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(HubOfflineError, match="no network.*untouched"):
        push_curriculum(str(run_copy), REPO, token=FAKE_TOKEN)


def test_token_appears_in_no_written_file_nor_log(run_copy, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    RecordingHub(monkeypatch)
    push_curriculum(str(run_copy), REPO, token=FAKE_TOKEN)
    push_adapter(run_copy / "world", REPO, subfolder="world", token=FAKE_TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubOfflineError) as err:
        push_curriculum(str(run_copy), REPO, token=FAKE_TOKEN)
    write_node_card(str(run_copy), "world")
    assert FAKE_TOKEN not in str(err.value) and FAKE_TOKEN not in caplog.text
    leaked = [name for name, data in _all_bytes(run_copy).items() if FAKE_TOKEN.encode() in data]
    assert leaked == []


def test_push_refuses_a_file_that_contains_the_token(run_copy, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub = RecordingHub(monkeypatch)
    metrics = json.loads((run_copy / "macro" / "metrics.json").read_text())
    (run_copy / "macro" / "metrics.json").write_text(json.dumps({**metrics, "args": {"token": FAKE_TOKEN}}))
    with pytest.raises(ValueError, match="macro/metrics.json: it contains the Hub token"):
        push_curriculum(str(run_copy), REPO, token=FAKE_TOKEN)
    assert hub.calls == []
