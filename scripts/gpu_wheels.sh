#!/usr/bin/env bash
# Wheels for running GWM on a GPU machine that has PyTorch, transformers and accelerate but no network and no
# diffusers/datasets (a typical CUDA image). Downloads, for CPython 3.12 on x86-64 Linux, the pure-Python packages GWM
# needs beyond such an image, at the versions installed in the current environment, into DIR (default .whl/).
# On the GPU machine:  scripts/gpu_check.sh --wheels DIR      (installs them into a temporary folder), or by hand:
#                      python3 -m pip install --no-index --no-deps --target /tmp/site DIR/*.whl
#                      export PYTHONPATH=/tmp/site:$PWD
# pyarrow (55 MB) goes to DIR/optional/: install it there only if the machine's pyarrow is older than datasets needs.
set -euo pipefail
DIR=${1:-.whl}; mkdir -p "$DIR/optional"
ver() { python3 -m pip show "$1" 2>/dev/null | awk '/^Version:/{print $2}'; }
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$@"; }
pkgs=()
for p in diffusers peft datasets dill multiprocess; do
  v=$(ver $p); [ -n "$v" ] && pkgs+=("$p==$v") || pkgs+=("$p")
done
get "$DIR" "${pkgs[@]}" importlib_metadata==8.7.0   # 8.7 needs only zipp; later ones add lazy-importer
v=$(ver pyarrow); get "$DIR/optional" "pyarrow${v:+==$v}"
ls -la "$DIR" "$DIR/optional"
