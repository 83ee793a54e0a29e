"""The loop tuner: finds the frozen blocks of a GWM model and wraps each in a `LoopLayer`."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner

from .config import ADAPTER_FORMAT_VERSION, DEFAULT_TARGET_MODULES, LoopConfig
from .layer import LoopLayer


class AdapterMismatchError(ValueError):
    """An adapter was made for a different base or canvas than the model it is loaded onto."""


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

    def _prepare_adapter_config(self, config: LoopConfig, model_config: dict) -> LoopConfig:
        # Record (or check) the architecture the adapter belongs to, and the config to rebuild its model from.
        arch = self.model.adapter_architecture()
        check_adapter_fits(config, **arch)
        config.inner_dim, config.num_blocks, config.d_model = arch["inner_dim"], arch["num_blocks"], arch["d_model"]
        if not config.gwm_config:
            config.gwm_config = self.model.config.to_diff_dict()
            for key in ("architectures", "transformers_version", "model_type", "dtype", "torch_dtype"):
                config.gwm_config.pop(key, None)
            config.gwm_config["n_loops"] = config.n_loops  # the adapter's own loop count, not the model default
            # what forecasting reads without building the model (to_diff_dict leaves defaults out)
            for key in ("quantile_levels", "window_scaling", "window_stats_input"):
                config.gwm_config[key] = getattr(self.model.config, key)
            config.format_version = ADAPTER_FORMAT_VERSION
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
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
