#!/usr/bin/env python
"""Train a GWM DAG curriculum: the source checkout's script for `gwm train` (modeling_gwm.training.train_cli).

    accelerate launch -q training/dag_train.py                   # the shipped demo, CPU, tiny base, no download
    accelerate launch -q training/dag_train.py --config my.yaml --base THUDM/CogVideoX-2b --mixed_precision bf16
    accelerate launch -q --multi_gpu --num_processes 2 training/dag_train.py   # DDP (gloo on CPU)

`python training/dag_train.py --help` lists every flag; errors are one line `dag_train.py: error: ...`, exit code 2.
"""

from __future__ import annotations

import sys

from modeling_gwm.training.train_cli import main as _train


def main(argv=None) -> int:
    return _train(argv, prog="dag_train.py")


if __name__ == "__main__":
    sys.exit(main())
