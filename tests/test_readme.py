"""README.md's Python code blocks run as written, in order, on the tiny base.

They run in one namespace from a folder holding `configuration/` (the repository's, linked), as a user in a checkout
would. The block with the seed's trainer API trains first (it writes `outputs/seed-api`); its run stands in for the
demo's `outputs/gwm-demo`, which the other blocks load.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)


@pytest.mark.slow
def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    blocks = _python_blocks()
    trainer_blocks = [b for b in blocks if "DAGCurriculumTrainer(" in b]
    assert len(trainer_blocks) == 1 and len(blocks) >= 5
    (tmp_path / "configuration").symlink_to(REPO / "configuration")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(trainer_blocks[0], "README.md (trainer block)", "exec"), namespace)
    assert (tmp_path / "outputs" / "seed-api" / "final" / "COMPLETE").is_file()
    shutil.copytree(tmp_path / "outputs" / "seed-api", tmp_path / "outputs" / "gwm-demo")
    for index, block in enumerate(blocks):
        if block is not trainer_blocks[0]:
            exec(compile(block, f"README.md (python block {index})", "exec"), namespace)
    assert len(namespace["preds"]) == 72  # predict_df: 3 items x 24 months, as the README's comment says
    assert os.path.isfile(tmp_path / "my-gwm" / "config.json")
