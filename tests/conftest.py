"""Shared test settings: no test may reach the Hugging Face Hub; every test runs on the tiny base.

Kept small on purpose: fixtures every test file may use, nothing specific to one of them.
"""

from __future__ import annotations

import pytest
import torch

from modeling_gwm.model.base import TINY_BASE_PATH

# The tiny models are far too small for intra-op threads: on a busy 2-core runner two threads spin-wait on each other
# and a tiny forward pass takes ~1 s instead of ~50 ms. Subprocesses are not affected (they read OMP_NUM_THREADS).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch):
    """Offline for everything that reads the variable at call time (PEFT, our messages, subprocesses).

    huggingface_hub reads it once at import; a test that needs the library itself offline patches
    `huggingface_hub.constants.HF_HUB_OFFLINE` too (see `hub_offline`).
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def hub_offline(monkeypatch):
    """huggingface_hub itself in offline mode: a Hub id fails at once instead of waiting on the network."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def tiny_base() -> str:
    """Path of the shipped tiny CogVideoX checkpoint (diffusers layout, 2 blocks, inner_dim 64)."""
    return TINY_BASE_PATH
