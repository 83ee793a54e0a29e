"""The loop adapter as a PEFT method of its own, registered with PEFT on import."""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from .config import PEFT_TYPE, LoopConfig
from .layer import LoopLayer
from .model import AdapterMismatchError, LoopModel, check_adapter_fits


def register() -> None:
    """Make `get_peft_model`, `PeftConfig.from_pretrained` and `PeftModel.from_pretrained` know the loop method.

    PEFT's `register_peft_method` only accepts members of its own `PeftType` enum, so the three mappings it would
    fill are filled here under the string type `"GWM_LOOP"` (PEFT accepts string peft types, see peft#2634).
    """
    PEFT_TYPE_TO_CONFIG_MAPPING.setdefault(PEFT_TYPE, LoopConfig)
    PEFT_TYPE_TO_TUNER_MAPPING.setdefault(PEFT_TYPE, LoopModel)
    PEFT_TYPE_TO_PREFIX_MAPPING.setdefault(PEFT_TYPE, LoopModel.prefix)


register()

__all__ = [
    "PEFT_TYPE", "AdapterMismatchError", "LoopConfig", "LoopLayer", "LoopModel", "check_adapter_fits", "register",
]
