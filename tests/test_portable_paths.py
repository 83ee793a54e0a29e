"""Saved models and adapters travel: the base they record loads from any working directory, and PEFT's own loaders
(`AutoPeftModel`, `PeftModel.from_pretrained` onto a bare base) rebuild the model the adapter was trained on."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from _tiny import canvas_batch, train_steps
from peft import AutoPeftModel, PeftModel, get_peft_model

from modeling_gwm import GWMModel, LoopConfig

FIELDS = [dict(name="climate.enso.nino12_sst", mean=23.0, std=2.0, transform="none", unit="degC")]


@pytest.fixture
def elsewhere(tmp_path, tiny_base, monkeypatch):
    """A copy of the tiny base, reached through a relative path from the working directory `tmp_path/work`."""
    shutil.copytree(tiny_base, tmp_path / "work" / "bases" / "tiny")
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path


def test_a_base_given_by_relative_path_is_saved_absolute(elsewhere, monkeypatch):
    model = GWMModel.from_pretrained("bases/tiny", d_model=16)
    model.save_pretrained("my-gwm")
    absolute = str(elsewhere / "work" / "bases" / "tiny")
    assert json.loads((elsewhere / "work" / "my-gwm" / "config.json").read_text())["base_model_name_or_path"] == \
        absolute
    peft_model = get_peft_model(model, LoopConfig(n_loops=2, fields=FIELDS))
    peft_model.save_pretrained("adapter")
    config = json.loads((elsewhere / "work" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == config["gwm_config"]["base_model_name_or_path"] == absolute

    monkeypatch.chdir(elsewhere)  # another working directory: both load by the recorded base
    reloaded = GWMModel.from_pretrained(os.path.join("work", "my-gwm"))
    assert reloaded.config.base_model_name_or_path == absolute
    assert isinstance(GWMModel.from_pretrained(os.path.join("work", "adapter")), PeftModel)


def test_a_hub_id_is_recorded_as_given():
    from modeling_gwm import GWMConfig

    assert GWMConfig(base_model_name_or_path="THUDM/CogVideoX-2b").base_model_name_or_path == "THUDM/CogVideoX-2b"


def test_auto_peft_model_loads_an_adapter_with_its_own_settings(tmp_path, tiny_base):
    model = get_peft_model(GWMModel.from_pretrained(tiny_base, d_model=16, quantile_levels=[0.2, 0.5, 0.8]),
                           LoopConfig(n_loops=2, fields=FIELDS))
    train_steps(model, steps=2)
    model.save_pretrained(str(tmp_path / "adapter"))
    model.eval()
    values, presence, target = canvas_batch()
    with torch.no_grad():
        expected = model(values[..., :1], presence[..., :1], target_mask=target[..., :1]).quantiles

    # PEFT's own loader: the base class it records needs PEFT's import allow-list for a package outside transformers
    loaded = AutoPeftModel.from_pretrained(str(tmp_path / "adapter"), import_allowlist=["modeling_gwm"])
    assert isinstance(loaded, PeftModel) and loaded.base_model.model.config.d_model == 16
    # and a bare base takes the adapter's settings (d_model, quantile levels) with PeftModel.from_pretrained too
    onto_bare = PeftModel.from_pretrained(GWMModel.from_pretrained(tiny_base), str(tmp_path / "adapter"))
    for peft_model in (loaded, onto_bare):
        with torch.no_grad():
            got = peft_model.eval()(values[..., :1], presence[..., :1], target_mask=target[..., :1]).quantiles
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
