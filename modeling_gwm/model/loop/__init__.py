"""The loop adapter as a PEFT method of its own, registered with PEFT on import."""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from .config import PEFT_TYPE, LoopConfig
from .layer import LoopLayer
from .model import AdapterMismatchError, LoopMergeError, LoopModel, check_adapter_fits


def register() -> None:
    """Make `get_peft_model`, `PeftConfig.from_pretrained` and `PeftModel.from_pretrained` know the loop method.

    PEFT's `register_peft_method` only accepts members of its own `PeftType` enum, so the three mappings it would
    fill are filled here under the string type `"GWM_LOOP"` (PEFT accepts string peft types, see peft#2634).
    """
    for mapping, value in ((PEFT_TYPE_TO_CONFIG_MAPPING, LoopConfig), (PEFT_TYPE_TO_TUNER_MAPPING, LoopModel),
                           (PEFT_TYPE_TO_PREFIX_MAPPING, LoopModel.prefix)):
        other = mapping.get(PEFT_TYPE, value)
        if other != value:  # same classes again (a second import) is fine; someone else's is not silently kept
            raise ValueError(f"PEFT type {PEFT_TYPE!r} is already registered to {other!r}, not GWM's {value!r}; "
                             "remove the other registration before importing modeling_gwm")
    PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = LoopConfig
    PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = LoopModel
    PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = LoopModel.prefix


register()

__all__ = [
    "PEFT_TYPE", "AdapterMismatchError", "LoopConfig", "LoopLayer", "LoopMergeError", "LoopModel", "check_adapter_fits",
    "register",
]
