#!/usr/bin/env bash
# One-command GPU check of GWM: what a machine with one CUDA GPU and no network runs (aimed at under 5 minutes).
#
#   scripts/gpu_check.sh                      # on the GPU machine, from anywhere: writes benchmarks/results/gpu/
#   scripts/gpu_check.sh --wheels DIR         # the same, first installing the wheels in DIR (see below)
#   scripts/gpu_check.sh --cpu [--out DIR]    # the same steps at tiny sizes on the CPU: a smoke test (CI runs it)
#
# Steps, each with its log in the output folder (default benchmarks/results/gpu/; --out DIR or GWM_GPU_CHECK_OUT;
# with --cpu a new temporary folder):
#   1. cuda_tests       python -m pytest tests/test_cuda.py (skipped, each with its reason, without CUDA)
#   2. bench_width      benchmarks/bench_gpu_width.py at 2,048 and 8,192 positions, checkpointing none / loop /
#                       application                                   -> gpu_width.json
#   3. bench_compiled   the same with --compile_blocks, no checkpointing -> gpu_width_compiled.json (not with --cpu:
#                       there step 4 takes the compiled path, with TORCH_COMPILE_DISABLE=1)
#   4. bench_packed     2,048 positions x 4 canvases a step, compiled   -> gpu_width_packed.json
#   5. demo             accelerate launch training/dag_train.py (the shipped demo, bf16 mixed precision), into a
#                       temporary folder                                 -> demo_dag.json
#   6. forecast         gwm forecast --device cuda on the demo's final/ adapter              -> forecast.csv
#   7. evaluate         gwm evaluate --device cuda (naive baselines)                         -> evaluate.json
# then summary.json: the GPU's name, torch / CUDA / driver versions, the date, every step's exit code and seconds,
# the benchmark rows and the demo's validation losses. Exit code: 0 when every step passed, else 1 (2: bad usage or
# a missing package). GWM_GPU_CHECK_DEMO_STEPS caps the demo's steps per node (default: the demo's own 240).
#
# What the GPU machine needs. Python >= 3.10 with torch (CUDA build), transformers, accelerate, safetensors, numpy,
# pandas, pyyaml, matplotlib, filelock, tqdm, huggingface_hub and pytest (a typical CUDA image has them), plus this
# repository's working tree (the tiny base configuration/tiny-cogvideox and the data in configuration/data travel
# with it; nothing is downloaded: HF_HUB_OFFLINE=1). A CUDA image usually LACKS diffusers, peft and datasets (and
# datasets' dill and multiprocess). Carry them as wheels: on a machine with network and the same package versions,
#     scripts/gpu_wheels.sh DIR           (pure-Python wheels for CPython 3.12, x86-64 Linux: diffusers, peft,
#                                          datasets, dill, multiprocess, importlib_metadata; pyarrow, 55 MB, in
#                                          DIR/optional/ for a machine whose pyarrow is older than datasets needs)
# and copy DIR along; `--wheels DIR` installs DIR/*.whl with pip --no-index --no-deps into a temporary folder and
# puts that on PYTHONPATH (add DIR/optional/*.whl by hand if needed). Before anything runs, it lists what is missing.
set -uo pipefail

MODE=gpu
OUT=${GWM_GPU_CHECK_OUT:-}
WHEELS=${GWM_WHEELS:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) MODE=cpu ;;
    --out) OUT=${2:?--out needs a folder}; shift ;;
    --wheels) WHEELS=${2:?--wheels needs a folder of .whl files}; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
if [ -z "$OUT" ]; then
  if [ "$MODE" = cpu ]; then OUT=$(mktemp -d "${TMPDIR:-/tmp}/gwm-gpu-check-cpu.XXXXXX"); else OUT=$REPO/benchmarks/results/gpu; fi
fi
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gwm-gpu-check-work.XXXXXX")  # the demo run and installed wheels: not results
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 GWM_PROGRESS=0 PYTHONDONTWRITEBYTECODE=1
if [ -n "$WHEELS" ]; then
  "$PY" -m pip install -q --no-index --no-deps --target "$WORK/site" "$WHEELS"/*.whl || exit 2
  export PYTHONPATH="$WORK/site:$REPO"
else
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
cd "$REPO" || exit 2

# ------------------------------------------------------------------------------------------------ preflight
"$PY" - "$MODE" <<'EOF' || exit 2
import importlib.util, sys
need = ["torch", "transformers", "accelerate", "safetensors", "diffusers", "peft", "datasets", "pandas", "pyarrow",
        "yaml", "matplotlib", "filelock", "tqdm", "huggingface_hub", "pytest"]
missing = [name for name in need if importlib.util.find_spec(name) is None]  # found, not imported: fast
if missing:
    sys.exit("gpu_check.sh: missing package(s): " + ", ".join(missing) + "; carry wheels made by "
             "scripts/gpu_wheels.sh DIR and rerun with --wheels DIR (see the comment at the top of this script)")
if sys.argv[1] == "gpu":
    import torch
    if not torch.cuda.is_available():
        sys.exit(f"gpu_check.sh: torch {torch.__version__} finds no CUDA device; run scripts/gpu_check.sh --cpu for "
                 "the CPU smoke test")
EOF

if [ "$MODE" = gpu ]; then
  DEVICE=cuda
  WIDTH=(--positions 2048 8192)
  PACKED=(--positions 2048 --batch_size 4)
  DEMO=(--mixed_precision bf16 --max_steps "${GWM_GPU_CHECK_DEMO_STEPS:-240}")
  LAUNCH=("$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --dynamo_backend no)
  COMPILE_ENV=()
else  # tiny sizes: the same code paths in seconds (the compiled runs with TORCH_COMPILE_DISABLE: the path, no compiler)
  DEVICE=cpu
  TINY=(--device cpu --num_layers 1 --num_attention_heads 1 --fields 2 --n_loops 2 --repeats 1 --warmup 0)
  WIDTH=("${TINY[@]}" --positions 16 32)
  PACKED=("${TINY[@]}" --positions 16 --batch_size 2)
  DEMO=(--mixed_precision no --max_steps 1)
  LAUNCH=("$PY")  # one process either way; accelerate's launcher would only cost another interpreter start
  COMPILE_ENV=(TORCH_COMPILE_DISABLE=1)
fi

STEPS_FILE=$OUT/steps.tsv
: > "$STEPS_FILE"
step() {  # step NAME COMMAND...: run it, its output in OUT/NAME.log, its exit code and seconds in steps.tsv
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*"
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$STEPS_FILE"
  echo "   exit $rc in $((SECONDS - start)) s (log: $OUT/$name.log)"
  [ "$rc" -eq 0 ] || tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
}

step cuda_tests "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py
step bench_width "$PY" benchmarks/bench_gpu_width.py "${WIDTH[@]}" --out "$OUT/gpu_width.json"
[ "$MODE" = cpu ] ||  # on the CPU the packed run below takes the same compiled path
  step bench_compiled env "${COMPILE_ENV[@]}" "$PY" benchmarks/bench_gpu_width.py "${WIDTH[@]}" --checkpointing none \
    --compile_blocks --out "$OUT/gpu_width_compiled.json"
step bench_packed env "${COMPILE_ENV[@]}" "$PY" benchmarks/bench_gpu_width.py "${PACKED[@]}" --checkpointing none \
  --compile_blocks --out "$OUT/gpu_width_packed.json"
step demo "${LAUNCH[@]}" training/dag_train.py --output_dir "$WORK/demo" "${DEMO[@]}"
cp "$WORK/demo/dag.json" "$OUT/demo_dag.json" 2>/dev/null
ENSO=(--data configuration/data/elnino_nino12_monthly.csv --columns sst=climate.enso.nino12_sst --device "$DEVICE")
step forecast "$PY" -m modeling_gwm.commands forecast --adapter "$WORK/demo/final" "${ENSO[@]}" --horizon 24 \
  --out "$OUT/forecast.csv"
step evaluate "$PY" -m modeling_gwm.commands evaluate --adapter "$WORK/demo/final" "${ENSO[@]}" --holdout 12 \
  --methods naive,seasonal_naive --json "$OUT/evaluate.json"

# ------------------------------------------------------------------------------------------------ summary.json
"$PY" - "$OUT" "$MODE" <<'EOF'
import datetime, importlib.metadata, json, platform, subprocess, sys
from pathlib import Path

out, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "gpu":
    import torch
    gpu, cuda = torch.cuda.get_device_name(), torch.version.cuda
    memory = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
else:  # no torch import for the smoke test: it only costs time
    gpu = cuda = memory = None
def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None
steps = [dict(zip(("step", "exit_code", "seconds"), line.split("\t"))) for line in
         (out / "steps.tsv").read_text().splitlines()]
for s in steps:
    s["exit_code"], s["seconds"] = int(s["exit_code"]), int(s["seconds"])
try:
    driver = None if mode == "cpu" else subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True,
        timeout=20).stdout.strip() or None
except (OSError, subprocess.SubprocessError):
    driver = None
bench = {}
for name in ("gpu_width", "gpu_width_compiled", "gpu_width_packed"):
    result = load(f"{name}.json")
    bench[name] = None if result is None else [
        {"positions": r["positions"], "batch_size": r["batch_size"], "checkpointing": r["checkpointing"],
         "step_ms": round(r["step"]["median_s"] * 1e3, 2), "frozen_work_ms": round(r["frozen_work_s"] * 1e3, 2),
         "outside_frozen_share": round(r["outside_frozen_share"], 4), "mfu_useful": r["mfu_useful"],
         "peak_above_resident_mib": None if r["peak_above_resident_bytes"] is None else
         round(r["peak_above_resident_bytes"] / 2**20, 1)} for r in result["rows"]]
dag = load("demo_dag.json")
summary = {
    "check": "scripts/gpu_check.sh" + (" --cpu" if mode == "cpu" else ""),
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "gpu": gpu, "gpu_memory_gib": memory, "torch": importlib.metadata.version("torch"), "cuda": cuda,
    "driver": driver, "python": platform.python_version(),
    "passed": all(s["exit_code"] == 0 for s in steps), "steps": steps, "bench": bench,
    "demo_val_loss": None if dag is None else {n: [e.get("val_loss_start"), e.get("val_loss_end")]
                                               for n, e in dag["nodes"].items()},
    "evaluate": load("evaluate.json"),
}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"\nsummary: {out / 'summary.json'} ({'all steps passed' if summary['passed'] else 'SOME STEPS FAILED'}; "
      f"{summary['gpu'] or 'no GPU'}, torch {summary['torch']}, CUDA {summary['cuda']})")
EOF
awk -F'\t' '$2 != 0 {bad = 1} END {exit bad}' "$STEPS_FILE"
