"""GWM: a world model for heterogeneous time series grafted onto a frozen CogVideoX video transformer."""

from transformers import AutoConfig, AutoModel

from .configuration_gwm import GWMConfig
from .loop import AdapterMismatchError, LoopConfig, LoopLayer, LoopModel
from .modeling_gwm import AdapterLoadError, GWMModel, GWMOutput

AutoConfig.register("gwm", GWMConfig, exist_ok=True)
AutoModel.register(GWMConfig, GWMModel, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "AdapterLoadError",
    "AdapterMismatchError",
    "GWMConfig",
    "GWMModel",
    "GWMOutput",
    "LoopConfig",
    "LoopLayer",
    "LoopModel",
]
