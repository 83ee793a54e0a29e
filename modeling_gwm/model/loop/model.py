"""The loop tuner: finds the frozen blocks of a GWM model and wraps each in a `LoopLayer`."""

from __future__ import annotations

import copy
import logging

import torch
from peft.tuners.tuners_utils import BaseTuner, _get_submodules
from peft.utils import AuxiliaryTrainingWrapper, get_peft_model_state_dict, set_peft_model_state_dict

from ...tabular import finest_frequency, is_coarser, parse_frequency
from ..configuration_gwm import FORECAST_SETTINGS
from ..merging import MERGE_METHODS, MergeSpec, merge_adapters
from .config import ADAPTER_FORMAT_VERSION, DEFAULT_TARGET_MODULES, LoopConfig, without_calibration
from .layer import LoopLayer

logger = logging.getLogger(__name__)


class AdapterMismatchError(ValueError):
    """An adapter was made for a different base or canvas than the model it is loaded onto."""


class LoopMergeError(ValueError):
    """`merge_and_unload`/`merge_adapter` on a loop adapter: a loop has no equivalent in the base's weights."""


def check_adapter_fits(config: LoopConfig, *, inner_dim: int, num_blocks: int, d_model: int, where: str = "") -> None:
    """Raise one clear sentence when an adapter's recorded architecture differs from the model's."""
    recorded = {"inner_dim": config.inner_dim, "num_blocks": config.num_blocks, "d_model": config.d_model}
    actual = {"inner_dim": inner_dim, "num_blocks": num_blocks, "d_model": d_model}
    wrong = [f"{k} {recorded[k]} (model has {actual[k]})" for k in recorded if recorded[k] not in (None, actual[k])]
    if wrong:
        raise AdapterMismatchError(
            f"Adapter{(' ' + where) if where else ''} does not fit this base: it was made for " + ", ".join(wrong)
            + ". Load it onto the base it was trained with."
        )


class LoopModel(BaseTuner):
    """PEFT tuner of the loop adapter (a sibling of `IA3Model`/`LoraModel`)."""

    prefix: str = "loop_"
    tuner_layer_cls = LoopLayer
    target_module_mapping = {"gwm": DEFAULT_TARGET_MODULES}

    def __init__(self, model, peft_config, adapter_name: str, **kwargs):
        # A base loaded with no GWM settings (as AutoPeftModel does) takes the first adapter's (GWMModel docs)
        config = peft_config[adapter_name] if isinstance(peft_config, dict) else peft_config
        if hasattr(model, "with_adapter_settings"):
            model = model.with_adapter_settings(config.gwm_config)
        super().__init__(model, peft_config, adapter_name, **kwargs)

    def _prepare_adapter_config(self, config: LoopConfig, model_config: dict) -> LoopConfig:
        # Record (or check) the architecture the adapter belongs to, and the config to rebuild its model from.
        arch = self.model.adapter_architecture()
        check_adapter_fits(config, **arch)
        config.inner_dim, config.num_blocks, config.d_model = arch["inner_dim"], arch["num_blocks"], arch["d_model"]
        if not config.gwm_config:
            config.gwm_config = self.model.config.to_diff_dict()
            for key in ("architectures", "transformers_version", "model_type", "dtype", "torch_dtype",
                        "compile_blocks"):  # compile_blocks: how this process runs the base, not the adapter's
                config.gwm_config.pop(key, None)
            config.gwm_config["n_loops"] = config.n_loops  # the adapter's own loop count, not the model default
            # what forecasting reads without building the model (to_diff_dict leaves defaults out)
            for key in FORECAST_SETTINGS:
                config.gwm_config[key] = getattr(self.model.config, key)
            config.format_version = ADAPTER_FORMAT_VERSION
        # The base is written from gwm_config when the config is saved (LoopConfig.to_dict). Kept empty in memory:
        # PEFT's save_pretrained would otherwise probe the base (the Hub, for an id) for a vocabulary config.json.
        config.base_model_name_or_path = None
        if config.base_weights is None:
            config.base_weights = self.model.base_weights_sample()
        if self.model.config.backbone == "scratch":
            config.train_blocks = True  # random blocks carry no prior: they are trained with the adapter
        if len(config.fields) > self.model.config.max_fields:
            raise ValueError(f"Adapter has {len(config.fields)} fields, the model only {self.model.config.max_fields} "
                             "field slots (GWMConfig.max_fields).")
        return config

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # PEFT strips the adapter name only where it is last or next to last (`lora_A.default.weight`); a trained
        # block copy nests deeper (`loop_block.default.ff.net.0.proj.weight`). Saving and loading both go through this
        # mapping, so the file never holds the adapter's name and loads under any name.
        key = key.replace(f".loop_block.{adapter_name}.", ".loop_block.")
        return super()._remove_adapter_name_from_key(key, adapter_name)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, LoopLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = LoopLayer(target, adapter_name, peft_config, inner_dim=peft_config.inner_dim)
        new_module.gradient_checkpointing = bool(getattr(self.model.config, "gradient_checkpointing", False))
        new_module.gradient_checkpointing_granularity = getattr(self.model.config, "gradient_checkpointing_granularity",
                                                                "loop")
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # ------------------------------------------------------------------ PEFT switches
    def _check_merge_allowed(self):
        # PEFT calls this first in merge_adapter and merge_and_unload.
        raise LoopMergeError("A loop adapter cannot be merged into the base weights: it runs each frozen block "
                             "several times, which no single set of block weights reproduces; use unload() for the "
                             "plain model or keep the adapter.")

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: list[str] | None = None):
        """`unload()`: every `LoopLayer` back to its raw block, every `modules_to_save` wrapper to the active adapter's
        copy (PEFT's rule for modules_to_save); returns the plain `GWMModel`, whose blocks run once."""
        if merge:
            self._check_merge_allowed()
        wrapped = [name for name, module in self.model.named_modules()
                   if isinstance(module, (LoopLayer, AuxiliaryTrainingWrapper))]
        for name in wrapped:
            parent, target, target_name = _get_submodules(self.model, name)
            plain = (target.get_base_layer() if isinstance(target, LoopLayer) else
                     target.unload_and_optionally_merge_module(merge=False, safe_merge=False, adapter_names=None))
            setattr(parent, target_name, plain)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "linear", density: float = 0.5,
                             majority_sign_method: str = "total", init: str | dict[str, torch.Tensor] | None = None,
                             seed: int = 0) -> None:
        """Add `adapter_name`, a merge of adapters loaded on this model (LoRA's `add_weighted_adapter` shape).

        The merge is the curriculum's join (`modeling_gwm.model.merging`): `linear` is the weighted average of the
        adapters (weights are shares, normalised to sum 1) and needs nothing else. Every other method merges task
        vectors, adapter - init, so it needs the adapters' common initialisation: `init` is the name of a loaded adapter
        holding it (a fresh adapter added to a model built with the training seed) or its state dict. Field
        embeddings merge by field name; the new adapter's fields are the adapters' fields in order of appearance.
        Adapters trained on different grids (a weekly and a quarterly one) merge onto the finest, as a join node
        trains on the finest of its sources: each field keeps its own frequency (forecast on its own calendar), a
        warning says so, and the window settings are those of the (first) adapter on that grid.
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"add_weighted_adapter: an adapter named {adapter_name!r} already exists")
        unknown = [a for a in adapters if a not in self.peft_config]
        if not adapters or unknown:
            raise ValueError(f"add_weighted_adapter: unknown adapter(s) {unknown or adapters}; loaded: "
                             f"{sorted(self.peft_config)}")
        if len(weights) != len(adapters):
            raise ValueError(f"add_weighted_adapter: {len(weights)} weights for {len(adapters)} adapters")
        if combination_type not in MERGE_METHODS:
            raise ValueError(f"add_weighted_adapter: unknown combination_type {combination_type!r}; valid: "
                             f"{', '.join(MERGE_METHODS)}")
        configs = [self.peft_config[a] for a in adapters]
        for key in ("n_loops", "train_blocks"):
            values = {a: getattr(c, key) for a, c in zip(adapters, configs)}
            if len(set(values.values())) > 1:
                raise ValueError(f"add_weighted_adapter: the adapters differ in {key} ({values}); only adapters of "
                                 "one shape can be merged")
        states = [get_peft_model_state_dict(self, adapter_name=a) for a in adapters]
        init_state = self._merge_init_state(init, combination_type, states[0])
        meta, finest = _merged_fields(adapters, configs, adapter_name)
        spec = MergeSpec(combination_type, list(weights), density, majority_sign_method)
        merged = merge_adapters(states, [c.field_names for c in configs], list(meta), init_state, spec=spec,
                                seed=seed)
        config = copy.deepcopy(configs[finest])  # its window and season are those of the grid the merge is on
        config.fields = list(meta.values())
        config.inference_mode = False
        self.peft_config[adapter_name] = config
        try:
            self.inject_adapter(self.model, adapter_name)
        except Exception:
            del self.peft_config[adapter_name]
            raise
        set_peft_model_state_dict(self, merged, adapter_name=adapter_name)

    def _merge_init_state(self, init: str | dict[str, torch.Tensor] | None, combination_type: str,
                          like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapters' common initialisation for `add_weighted_adapter` (tuner keys), from `init` as given there."""
        if init is None:
            if combination_type != "linear":
                raise ValueError(f"add_weighted_adapter: {combination_type!r} merges task vectors from the adapters' "
                                 "common initialisation; pass init= (a loaded adapter's name or a state dict), or "
                                 "use 'linear', the weighted average, which needs none")
            return {k: torch.zeros_like(v) for k, v in like.items()}  # linear: Σ w_i θ_i exactly
        if isinstance(init, str):
            if init not in self.peft_config:
                raise ValueError(f"add_weighted_adapter: init adapter {init!r} is not loaded")
            return get_peft_model_state_dict(self, adapter_name=init)
        # a PeftModel's state dict carries a "base_model." prefix that the tuner's does not
        return {k.removeprefix("base_model."): v for k, v in init.items()}


def _merged_fields(adapters: list[str], configs: list[LoopConfig], adapter_name: str) -> tuple[dict[str, dict], int]:
    """The merged adapter's field entries by name (first adapter's entry for a shared field) and the index of the
    (first) adapter on the finest grid. Adapters on different grids: every entry moves to that grid, keeping its
    own frequency (`own_frequency`, else its adapter's grid), with a warning; on one grid, the entries as they are."""
    grids = {a: next((f["frequency"] for f in c.fields if f.get("frequency")), None) for a, c in zip(adapters, configs)}
    known = {a: g for a, g in grids.items() if g}
    finest = finest_frequency(known.values()) if known else None
    mixed = len({parse_frequency(g) for g in known.values()}) > 1
    meta: dict[str, dict] = {}
    for config in configs:
        for entry in config.fields:
            if entry["name"] not in meta:
                entry = without_calibration(entry)  # the merge has no calibration of its own
                own = entry.get("own_frequency") or entry.get("frequency")
                meta[entry["name"]] = {**entry, "frequency": finest, "own_frequency": own} if mixed else entry
    if mixed:
        coarser = {n: e["own_frequency"] for n, e in meta.items() if is_coarser(e["own_frequency"], finest)}
        logger.warning("add_weighted_adapter: the adapters are on different grids (%s); %r is on the finest, %s, as a "
                       "join node is, and each field keeps its own frequency (%s): forecasts of those fields come out "
                       "on their own calendar", ", ".join(f"{a} {g}" for a, g in known.items()), adapter_name, finest,
                       ", ".join(f"{n} {f}" for n, f in coarser.items()))
    index = next(i for i, a in enumerate(adapters) if not finest or (grids[a] and parse_frequency(grids[a]) ==
                                                                     parse_frequency(finest)))
    return meta, index
