"""GWM: a world model for heterogeneous time series grafted onto a frozen CogVideoX video transformer."""

from transformers import AutoConfig, AutoModel

from .configuration_gwm import GWMConfig
from .loop import AdapterMismatchError, LoopConfig, LoopLayer, LoopMergeError, LoopModel
from .modeling_gwm import AdapterLoadError, GWMModel, GWMOutput

AutoConfig.register("gwm", GWMConfig, exist_ok=True)
AutoModel.register(GWMConfig, GWMModel, exist_ok=True)

__version__ = "0.1.0"

# The training side (accelerate, pandas, the data pipeline) is imported on first use, so `import modeling_gwm` and
# `gwm --help` stay as fast as the model alone.
_LAZY = {"DAGCurriculumTrainer": "trainer", "TrainingNode": "curriculum", "MergeSpec": "curriculum",
         "Curriculum": "curriculum", "load_curriculum": "curriculum"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdapterLoadError",
    "Curriculum",
    "DAGCurriculumTrainer",
    "MergeSpec",
    "TrainingNode",
    "load_curriculum",
    "AdapterMismatchError",
    "GWMConfig",
    "GWMModel",
    "GWMOutput",
    "LoopConfig",
    "LoopLayer",
    "LoopMergeError",
    "LoopModel",
]
