"""GWM: a world model for heterogeneous time series grafted onto a frozen CogVideoX video transformer.

The public names are imported on first use (PEP 562 module `__getattr__`), so `gwm --help` and `import modeling_gwm`
do not pay for torch, transformers, diffusers and peft. `GWMConfig` registers itself with `AutoConfig` and
`GWMModel` with `AutoModel` when their modules are imported, and the loop method registers with PEFT the same way:
touching `modeling_gwm.GWMModel` (or importing `modeling_gwm.model.modeling_gwm`) is enough for
`AutoModel.from_pretrained` and `peft.AutoPeftModel.from_pretrained` (which also needs
`import_allowlist=["modeling_gwm"]`); when peft is already imported, `import modeling_gwm` registers the loop method at
once.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY = {
    "AdapterLoadError": "model.adapter_files",
    "GWMModel": "model.modeling_gwm",
    "GWMOutput": "model.modeling_gwm",
    "GWMConfig": "model.configuration_gwm",
    "GWMPipeline": "forecasting.pipeline",
    "AdapterMismatchError": "model.loop",
    "LoopConfig": "model.loop",
    "LoopLayer": "model.loop",
    "LoopMergeError": "model.loop",
    "LoopModel": "model.loop",
    "DAGCurriculumTrainer": "training.trainer",
    "TrainingArguments": "training.training_args",
    "Curriculum": "training.curriculum",
    "MergeSpec": "model.merging",
    "TrainingNode": "training.curriculum",
    "load_curriculum": "training.curriculum",
    "TrainerCallback": "training.callbacks",
    "FaultInjectionCallback": "training.callbacks",
    "load_sources": "model.data",
    "make_tiny_cogvideox": "model.base",
}

__all__ = sorted(_LAZY)

if "peft" in sys.modules:  # peft already paid for: register the loop method now, so that `PeftConfig` / `AutoPeftModel`
    importlib.import_module(".model.loop", __name__)  # know "GWM_LOOP" after a plain `import modeling_gwm`


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
