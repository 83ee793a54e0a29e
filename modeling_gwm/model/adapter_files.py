"""Reading and validating a saved adapter folder (or a saved GWMModel's files) before any weights are loaded.

Every check names the file and the field at fault in one line: `adapter_config.json` against what GWM can build,
`adapter_model.safetensors` (from its header alone) against the model the config describes.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from torch import nn

from ..io_utils import file_sha256, read_json
from ..run_folder import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, CHECKSUM_KEY, METRICS_FILE
from .configuration_gwm import MODEL_LIMITS, GWMConfig
from .loop import AdapterMismatchError, LoopConfig, LoopLayer
from .loop.config import ADAPTER_FORMAT_VERSION, QUANTILE_SCALE_KEY

if TYPE_CHECKING:
    from .modeling_gwm import GWMModel


logger = logging.getLogger(__name__)
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors' names of the dtypes adapter weights may have
CONFIG_MAX_BYTES = 16 * 2**20  # an adapter_config.json with 65,536 fields is about 10 MB


class AdapterLoadError(OSError):
    """An adapter folder is missing files, holds a foreign PEFT method or a damaged weights file."""


def saved_model_file(location, filename: str, subfolder: str | None, revision: str | None, token,
                      hub_options: dict) -> str | None:
    """Path of `filename` of a model saved by `GWMModel.save_pretrained` (local folder or Hub repo), else None.
    For config.json, a config of another model type (or a CogVideoX checkpoint, which has none) is not ours."""
    local = os.path.join(str(location), subfolder or "", filename)
    if os.path.isdir(str(location)):
        path = local if os.path.isfile(local) else None
    else:
        from transformers.utils.hub import cached_file

        try:
            path = cached_file(str(location), filename, subfolder=subfolder or "", revision=revision, token=token,
                               _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False, **hub_options)
        except (OSError, ValueError):  # not a repo id, gated, unreachable: not a saved GWM model
            return None
    if path is None or filename != "config.json":
        return path
    try:
        return path if read_json(path, max_bytes=CONFIG_MAX_BYTES).get("model_type") == GWMConfig.model_type else None
    except (OSError, ValueError):
        return None


def expected_adapter_shapes(model: GWMModel, loop_config: LoopConfig, where: str) -> dict[str, tuple[int, ...]]:
    """The tensors (names as PEFT saves them, shapes) an adapter of `loop_config` holds for `model`.

    Derived from the built model, not hard-coded: the modules to save are read off the model, the looped blocks'
    tensors off a `LoopLayer` made for the config, so a change of the codec or the loop layer follows by itself.
    Also refuses `target_modules` / `modules_to_save` that select anything but the frozen blocks / GWM modules.
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    config_file = os.path.join(where, ADAPTER_CONFIG_FILE)
    prefix = "base_model.model."
    block_names = {f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))}
    for name, _ in model.named_modules():
        if name and name not in block_names and check_target_module_exists(loop_config, name):
            raise AdapterLoadError(f"{config_file}: target_modules {loop_config.target_modules!r} selects module "
                                   f"{name!r}; the loop adapter wraps whole transformer blocks only "
                                   "(transformer_blocks.<i>)")
    top = {name for name, _ in model.named_children()} - {"transformer_blocks"}
    saved = loop_config.modules_to_save or []
    unknown = [m for m in saved if m not in top]
    if unknown:
        raise AdapterLoadError(f"{config_file}: modules_to_save names {unknown}, which are not GWM modules "
                               f"(valid: {sorted(top)})")
    shapes = {f"{prefix}{m}.{k}": tuple(v.shape) for m in saved for k, v in getattr(model, m).state_dict().items()}
    probe = LoopLayer(nn.Linear(1, 1), "probe", replace(loop_config, train_blocks=False), inner_dim=model.inner_dim)
    layer_shapes = {k.replace(".probe", ""): tuple(v.shape) for k, v in probe.named_parameters()
                    if not k.startswith("base_layer.")}  # loop_emb, loop_emb_enc, loop_gate
    for i, block in enumerate(model.transformer_blocks):
        if not check_target_module_exists(loop_config, f"transformer_blocks.{i}"):
            continue
        shapes |= {f"{prefix}transformer_blocks.{i}.{k}": v for k, v in layer_shapes.items()}
        if loop_config.train_blocks:
            shapes |= {f"{prefix}transformer_blocks.{i}.loop_block.{k}": tuple(v.shape)
                       for k, v in block.state_dict().items()}
    return shapes


def check_adapter_weights(folder: str, loop_config: LoopConfig, arch: dict[str, int],
                           expected: dict[str, tuple[int, ...]] | None = None) -> None:
    """Check the weights file against the model from its header alone: a config edited by hand cannot hide a
    different n_loops, width, block count or canvas width, and a damaged file is named before PEFT reads it.

    With `expected` (`expected_adapter_shapes`), every tensor must be there with its shape and nothing else may be:
    PEFT would stop on a missing key or a wrong shape with a traceback, and load unknown tensors silently."""
    from safetensors import safe_open

    path = os.path.join(folder, ADAPTER_WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise AdapterLoadError(f"No {ADAPTER_WEIGHTS_FILE} in {folder}: the adapter has no weights.")
    try:
        with safe_open(path, framework="pt") as weights:
            shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
            dtypes = {key: weights.get_slice(key).get_dtype() for key in weights.keys()}
    except Exception as err:  # safetensors raises its own error type on damaged files
        raise AdapterLoadError(f"Adapter weights {path} are unreadable (truncated or not a safetensors file): "
                               f"{err}") from None
    not_float = sorted(k for k, d in dtypes.items() if d not in FLOAT_DTYPES)
    if not_float:  # integer weights load (cast by PEFT) and forecast a flat line
        raise AdapterMismatchError(f"Adapter weights {path}: tensor {not_float[0]} has dtype {dtypes[not_float[0]]} "
                                   f"({len(not_float)} such); adapter weights are floating point "
                                   f"({', '.join(FLOAT_DTYPES)})")
    prefix = "base_model.model."
    loop_shapes = {k: v for k, v in shapes.items() if k.startswith(prefix + "transformer_blocks.")
                   and k.endswith(".loop_emb")}
    wrong = []
    if len(loop_shapes) != arch["num_blocks"]:
        wrong.append(f"{len(loop_shapes)} looped blocks (model has {arch['num_blocks']})")
    loop_shape = (loop_config.n_loops, arch["inner_dim"])
    for shape in sorted(set(loop_shapes.values()) - {loop_shape}):
        wrong.append(f"loop embeddings of shape {shape} (n_loops {loop_config.n_loops} and inner_dim "
                     f"{arch['inner_dim']} expect {loop_shape})")
    proj_in = shapes.get(prefix + "proj_in.weight")
    if proj_in is not None and proj_in != (arch["inner_dim"], arch["d_model"]):
        wrong.append(f"proj_in of shape {proj_in} (model expects {(arch['inner_dim'], arch['d_model'])})")
    if wrong:
        raise AdapterMismatchError(f"Adapter weights {path} do not fit this model: " + "; ".join(wrong) + ".")
    if expected is None:
        return
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    misshapen = sorted(k for k in set(expected) & set(shapes) if shapes[k] != expected[k])

    def some(keys: list[str]) -> str:
        return ", ".join(k.removeprefix(prefix) for k in keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3
                                                                      else "")

    if extra:
        wrong.append(f"{len(extra)} unknown tensor(s) {some(extra)}")
    if missing:
        wrong.append(f"{len(missing)} missing tensor(s) {some(missing)}")
    for key in misshapen[:3]:
        wrong.append(f"{key.removeprefix(prefix)} of shape {shapes[key]} (model expects {expected[key]})")
    if wrong:
        raise AdapterMismatchError(f"Adapter weights {path} do not fit this model: " + "; ".join(wrong) + ".")


def load_adapter_config(adapter: str | os.PathLike, subfolder: str | None = None, revision: str | None = None,
                        token: str | bool | None = None) -> LoopConfig:
    """Read an adapter's `adapter_config.json`, refusing anything that is not a GWM loop adapter."""
    from peft import PeftConfig

    location = f"{adapter}" + (f" (subfolder {subfolder})" if subfolder else "")
    local = os.path.isdir(adapter)
    config_file = os.path.join(adapter, subfolder or "", ADAPTER_CONFIG_FILE)
    if local and (not os.path.exists(config_file) or os.path.isdir(config_file)):  # a device is read, bounded
        raise AdapterLoadError(f"No {ADAPTER_CONFIG_FILE} in {location}: not a GWM adapter folder.")
    if local:
        _check_raw_adapter_config(config_file)
    try:
        peft_config = PeftConfig.from_pretrained(str(adapter), subfolder=subfolder, revision=revision, token=token)
    except ValueError as err:
        raise AdapterLoadError(f"{location}/{ADAPTER_CONFIG_FILE} is not a valid PEFT adapter config: {err}") from None
    except OSError as err:
        raise AdapterLoadError(f"Could not fetch the adapter {location}: {str(err).splitlines()[0]}") from None
    except (TypeError, KeyError, AttributeError) as err:  # a hand-edited file PEFT's reader trips over
        raise AdapterLoadError(f"{location}/{ADAPTER_CONFIG_FILE} is not a valid PEFT adapter config: "
                               f"{type(err).__name__}: {err}") from None
    if not isinstance(peft_config, LoopConfig):
        raise AdapterLoadError(
            f"{location} holds a {getattr(peft_config.peft_type, 'value', peft_config.peft_type)} adapter, "
            "not a GWM loop adapter (peft_type GWM_LOOP)."
        )
    version = peft_config.format_version
    if version != ADAPTER_FORMAT_VERSION or isinstance(version, bool):
        if version is not None and not (isinstance(version, int) and not isinstance(version, bool)):
            raise AdapterLoadError(f"{config_file if local else location}: format_version must be the integer "
                                   f"{ADAPTER_FORMAT_VERSION}, got {version!r:.40}")
        found = "no format_version" if version is None else f"format_version {version}"
        raise AdapterLoadError(
            f"{location} has {found} (this GWM reads format_version {ADAPTER_FORMAT_VERSION}: scale-free window "
            "statistics and a value head over a context baseline): it was made by an older GWM and needs "
            "retraining (gwm train / dag_train.py)."
        )
    _check_loop_config(peft_config, config_file if local else f"{location}/{ADAPTER_CONFIG_FILE}")
    return peft_config


def warn_if_other_base(config: LoopConfig, sample: list[float] | None, where: str, base: str) -> None:
    """Warn when the base's weights are not those the adapter was trained on (`LoopConfig.base_weights`): the
    shapes fit, so it loads, but its forecasts assume the other base. bf16 / fp16 copies of one base agree."""
    import numpy as np

    recorded = config.base_weights
    if not recorded or not sample or len(recorded) != len(sample):
        return
    if not np.allclose(np.asarray(sample), np.asarray(recorded), rtol=2e-2, atol=1e-5):
        logger.warning("adapter %s was trained on a base with other weights than %s (a sample of the frozen weights "
                       "differs); its forecasts assume the base it was trained on: load it onto that base", where,
                       base)


def warn_if_changed(folder: str) -> None:
    """Warn when an adapter folder's weights are not those its metrics.json recorded (`adapter_sha256`, written by
    the trainer): damaged, or another adapter's file copied or linked in. Folders without the record are not checked."""
    path = os.path.join(folder, METRICS_FILE)
    try:
        recorded = read_json(path, max_bytes=CONFIG_MAX_BYTES).get(CHECKSUM_KEY) if os.path.isfile(path) else None
        if recorded is not None and recorded != file_sha256(os.path.join(folder, ADAPTER_WEIGHTS_FILE)):
            logger.warning("adapter weights %s are not the ones its %s recorded (%s differs): damaged or replaced "
                           "since training", os.path.join(folder, ADAPTER_WEIGHTS_FILE), METRICS_FILE, CHECKSUM_KEY)
    except (OSError, ValueError):  # an unreadable metrics.json is no reason to refuse the adapter
        return


# What a hand-edited adapter_config.json may ask the model to allocate: far above any real model, far below RAM.
ADAPTER_CONFIG_LIMITS = {k: MODEL_LIMITS[k] for k in ("max_fields", "d_model", "n_loops", "context_len",
                                                      "max_time_steps")}


def _check_raw_adapter_config(path: str) -> None:
    """The JSON must be an object with a known string peft_type (PEFT's reader raises TypeError/KeyError else)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    try:
        raw = read_json(path, max_bytes=CONFIG_MAX_BYTES)
    except ValueError as err:  # not JSON, not an object, or too large (e.g. linked to /dev/zero)
        raise AdapterLoadError(str(err)) from None
    peft_type = raw.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise AdapterLoadError(f"{path}: peft_type {peft_type!r} is not a PEFT method; a GWM adapter has peft_type "
                               "GWM_LOOP")


def _check_loop_config(config: LoopConfig, path: str) -> None:
    """Every value a loop adapter's config feeds to the model, checked with one line naming the file and key."""
    from ..tabular import DataError
    from .data import FieldStats, check_frequency

    def bad(key: str, why: str) -> AdapterLoadError:
        return AdapterLoadError(f"{path}: {key} {why}")

    if not isinstance(config.fields, list):
        raise bad("fields", f"must be a list of {{name, mean, std, transform}} objects, got {config.fields!r:.60}")
    names = []
    for i, entry in enumerate(config.fields):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise bad(f"fields[{i}]", f"must be an object with a 'name' string, got {entry!r:.60}")
        try:
            stats = FieldStats.from_dict(entry)
            if entry.get("frequency") is not None:
                check_frequency(entry["frequency"], "its grid")
            if entry.get("own_frequency") is not None:
                check_frequency(entry["own_frequency"], "its own_frequency")
        except (DataError, TypeError, ValueError, OverflowError) as err:
            raise bad(f"fields[{i}]", str(err)) from None
        if stats.std < sys.float_info.min:  # subnormal: dividing by it overflows, the forecast would be inf
            raise bad(f"fields[{i}]", f"std {stats.std!r} is below {sys.float_info.min:.3g} (a field's spread must be "
                      "a normal float)")
        names.append(entry["name"])
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise bad("fields", f"names {repeated} more than once")
    target = config.target_modules
    if not (isinstance(target, str) or (isinstance(target, (list, set)) and all(isinstance(t, str) for t in target))):
        raise bad("target_modules", f"must be a regex or a list of module names, got {target!r:.60}")
    if config.modules_to_save is not None and not (isinstance(config.modules_to_save, list) and all(
            isinstance(m, str) for m in config.modules_to_save)):
        raise bad("modules_to_save", f"must be a list of module names, got {config.modules_to_save!r:.60}")
    sample = config.base_weights
    if sample is not None and not (isinstance(sample, list) and len(sample) <= 1024 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in sample)):
        raise bad("base_weights", f"must be a list of at most 1024 finite numbers, got {sample!r:.60}")
    if not isinstance(config.gwm_config, dict):
        raise bad("gwm_config", f"must be an object (the model's GWMConfig), got {config.gwm_config!r:.60}")
    limits = {"n_loops": config.n_loops, **{k: config.gwm_config[k] for k in ADAPTER_CONFIG_LIMITS
                                            if k in config.gwm_config}}
    for key, value in limits.items():
        where = key if key == "n_loops" else f"gwm_config.{key}"
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= ADAPTER_CONFIG_LIMITS[key]:
            raise bad(where, f"must be an integer in 1..{ADAPTER_CONFIG_LIMITS[key]}, got {value!r}")
    try:
        gwm_config = GWMConfig(**config.gwm_config)
    except (TypeError, ValueError) as err:
        raise bad("gwm_config", str(err)) from None
    if len(names) > gwm_config.max_fields:
        raise bad("fields", f"has {len(names)} entries, more than gwm_config.max_fields={gwm_config.max_fields}")
    count = len(gwm_config.quantile_levels)
    for i, entry in enumerate(config.fields):  # quantile calibration (optional): one positive factor per level
        scale = entry.get(QUANTILE_SCALE_KEY)
        if scale is not None and not (isinstance(scale, list) and len(scale) == count and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf") for v in scale)):
            raise bad(f"fields[{i}].{QUANTILE_SCALE_KEY}", f"must be a list of {count} positive finite numbers (one "
                      f"per quantile level), got {scale!r:.60}")
