"""Shared test settings: no test may reach the Hugging Face Hub."""

import pytest


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
