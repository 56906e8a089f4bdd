#!/usr/bin/env bash
# GPU check for kilonerf_lbfgs: one command that exercises the CUDA path and prints a table.
#
# With a CUDA GPU (torch.cuda.is_available()):
#   1. nerfacc warm-up (loads, or JIT-builds once, its CUDA kernels),
#   2. the CUDA tests: python -m pytest -q -m cuda tests/ (nerfacc vs torch backend agreement),
#   3. lego trained at 400x400 for --seconds (configs/lego.txt, evaluated on every 8th test view),
#   4. a short orbit rendered at 800x800 with scripts/render_video.py (for the fps),
#   5. a markdown table: test PSNR, train seconds, render fps at 800x800, peak GPU memory.
#   Meant to finish in under 8 minutes on an H100 with the defaults (each step has a timeout).
# Without one: one line saying so, then a CPU smoke part (tests/test_nerf_render.py and a
# 30-second demo-scene training whose test PSNR is printed); about 2 minutes on a 2-core CPU.
#
# Peak GPU memory is measured two ways:
#   - torch's allocator: training and rendering run inside a small Python wrapper that reports
#     torch.cuda.max_memory_allocated() / max_memory_reserved() when the script ends (tensors
#     only; no CUDA context, no other processes);
#   - device-wide: if nvidia-smi exists, a background loop samples memory.used every 0.5 s during
#     training and rendering (includes the CUDA context and anything else on the GPU).
#
# Never installs from the network: with --wheels DIR, missing Python packages are installed with
# `pip install --no-index --find-links DIR`; without it the environment is assumed ready (missing
# packages are reported and the script stops).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bash scripts/gpu_check.sh [--wheels DIR] [--datadir DIR] [--seconds N] [--frames N]
                                 [--out DIR] [-h|--help]

Checks the CUDA path of kilonerf_lbfgs and prints a markdown table (test PSNR, train seconds,
render fps at 800x800, peak GPU memory). Without a CUDA GPU it says so and runs a CPU smoke part
(tests/test_nerf_render.py and a 30-second demo-scene training).

options:
  --wheels DIR   install missing Python packages only from the wheels in DIR
                 (pip install --no-index --find-links DIR); never from the network.
                 Default: assume the environment is ready.
  --datadir DIR  NeRF-synthetic lego folder (400x400 images). Default:
                 ../shared/data/nerf_synthetic/lego relative to the repository root if it
                 exists (else shared/data/nerf_synthetic/lego inside it); with no lego data the
                 GPU part trains the generated demo scene instead and says so.
  --seconds N    lego training seconds (default 180)
  --frames N     orbit frames rendered at 800x800 for the fps (default 8)
  --out DIR      output folder (default outputs/gpu_check, relative to the repository root)
  -h, --help     show this help and exit
EOF
}

die() { echo "gpu_check: $*" >&2; exit 2; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS=""
DATADIR=""
SECONDS_TRAIN=180
FRAMES=8
OUT="outputs/gpu_check"

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --wheels) [[ $# -ge 2 ]] || die "--wheels needs a folder"; WHEELS="$2"; shift 2 ;;
        --datadir) [[ $# -ge 2 ]] || die "--datadir needs a folder"; DATADIR="$2"; shift 2 ;;
        --seconds) [[ $# -ge 2 ]] || die "--seconds needs a number"; SECONDS_TRAIN="$2"; shift 2 ;;
        --frames) [[ $# -ge 2 ]] || die "--frames needs a number"; FRAMES="$2"; shift 2 ;;
        --out) [[ $# -ge 2 ]] || die "--out needs a folder"; OUT="$2"; shift 2 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done
[[ "$SECONDS_TRAIN" =~ ^[0-9]+$ && "$SECONDS_TRAIN" -gt 0 ]] \
    || die "--seconds must be a positive integer, got '$SECONDS_TRAIN'"
[[ "$FRAMES" =~ ^[0-9]+$ && "$FRAMES" -gt 0 ]] \
    || die "--frames must be a positive integer, got '$FRAMES'"
if [[ -n "$WHEELS" ]]; then
    [[ -d "$WHEELS" ]] || die "--wheels $WHEELS: no such folder"
    WHEELS="$(cd "$WHEELS" && pwd)"
fi
if [[ -n "$DATADIR" ]]; then
    [[ -d "$DATADIR" ]] || die "--datadir $DATADIR: no such folder"
    DATADIR="$(cd "$DATADIR" && pwd)"
fi

cd "$REPO"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOGS="$OUT/logs"
mkdir -p "$LOGS"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # the package runs from the checkout
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
T_START=$SECONDS
FAILED=()

# run_step NAME LIMIT_S CMD...: run CMD under a timeout, output to the console and to
# $LOGS/NAME.log; a failure is recorded (the script goes on) and the status is returned.
run_step() {
    local name="$1" limit="$2"
    shift 2
    local t0=$SECONDS rc=0
    echo
    echo "== $name (limit ${limit} s)"
    timeout -k 15 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log" || rc=$?
    if [[ $rc -eq 0 ]]; then
        echo "== $name: ok in $((SECONDS - t0)) s"
    else
        [[ $rc -eq 124 || $rc -eq 137 ]] && echo "== $name: TIMED OUT after ${limit} s" \
            || echo "== $name: FAILED (exit $rc) after $((SECONDS - t0)) s; log: $LOGS/$name.log"
        FAILED+=("$name")
    fi
    return $rc
}

# json_get FILE KEY FORMAT: one number from a metrics.json, or "n/a".
json_get() {
    "$PY" - "$1" "$2" "$3" <<'EOF' 2>/dev/null || echo "n/a"
import json, sys
path, key, fmt = sys.argv[1:]
print(format(json.load(open(path))[key], fmt))
EOF
}

# ---------------------------------------------------------------- dependencies
# import name:pip name -- what the NeRF path and the test collection import, plus pytest
# (nerfacc only on a GPU). libigl (meshes) and imageio-ffmpeg (videos fall back to OpenCV's
# MP4 writer without it) are not needed here.
DEPS=(torch:torch numpy:numpy scipy:scipy trimesh:trimesh imageio:imageio
      cv2:opencv-python-headless tqdm:tqdm configargparse:ConfigArgParse
      matplotlib:matplotlib skimage:scikit-image tifffile:tifffile soundfile:soundfile
      pytest:pytest)

missing_of() {   # prints the pip names (space-separated) of the import:pip deps that fail to import
    "$PY" - "$@" <<'EOF' 2>/dev/null || die "cannot run $PY"
import importlib, sys
missing = []
for dep in sys.argv[1:]:
    module, pip_name = dep.split(":", 1)
    try:
        importlib.import_module(module)
    except Exception:
        missing.append(pip_name)
print(" ".join(missing))
EOF
}

ensure_deps() {
    local missing
    missing=$(missing_of "$@")
    [[ -z "$missing" ]] && return 0
    if [[ -z "$WHEELS" ]]; then
        die "missing Python packages: $missing; pass --wheels DIR to install them from local" \
            "wheels (nothing is downloaded)"
    fi
    echo "installing from $WHEELS (no index): $missing"
    # shellcheck disable=SC2086  # word splitting wanted: one argument per package
    "$PY" -m pip install --no-index --find-links "$WHEELS" $missing
    missing=$(missing_of "$@")
    [[ -z "$missing" ]] || die "still missing after installing from $WHEELS: $missing"
}

ensure_deps "${DEPS[@]}"
HAS_CUDA=$("$PY" -c "import torch; print(torch.cuda.is_available())" 2>/dev/null || echo False)

# ---------------------------------------------------------------- CPU smoke part
if [[ "$HAS_CUDA" != "True" ]]; then
    echo "gpu_check: no CUDA GPU (torch.cuda.is_available() is False, torch" \
         "$("$PY" -c 'import torch; print(torch.__version__)')); running the CPU smoke part instead"
    run_step cpu_render_tests 300 "$PY" -m pytest -q tests/test_nerf_render.py || true
    SMOKE="$OUT/demo_smoke"
    rm -f "$SMOKE/metrics.json"
    # --resume is not passed: a checkpoint left from an earlier run is overwritten
    run_step cpu_demo_smoke 240 "$PY" scripts/train_nerf.py --config configs/demo.txt \
        --max_seconds 30 --out_dir "$SMOKE" --no_progress --device cpu || true
    if [[ -f "$SMOKE/metrics.json" ]]; then
        echo
        echo "demo smoke: test PSNR $(json_get "$SMOKE/metrics.json" test_psnr .2f) dB after" \
             "$(json_get "$SMOKE/metrics.json" train_seconds .0f) s of training on the CPU" \
             "(outputs in $SMOKE)"
    fi
    echo "gpu_check: CPU smoke part done in $((SECONDS - T_START)) s"
    if [[ ${#FAILED[@]} -gt 0 ]]; then
        echo "gpu_check: failed steps: ${FAILED[*]}" >&2
        exit 1
    fi
    exit 0
fi

# ---------------------------------------------------------------- GPU part
GPU_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
echo "gpu_check: CUDA GPU: $GPU_NAME (torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)'))"
ensure_deps nerfacc:nerfacc

# nerfacc 0.5.3 loads its kernels on first use (prebuilt wheel, or a one-time JIT build that
# needs nvcc and can take minutes). If they cannot load, the training and rendering below fall
# back to the pure-torch marcher (said in the table) so that the timings still come out.
BACKEND="nerfacc"
if ! run_step nerfacc_kernels 240 "$PY" -c "
from nerfacc.cuda._backend import _C
assert _C is not None, 'nerfacc CUDA kernels not available (no prebuilt wheel and no nvcc)'
print('nerfacc kernels loaded')"; then
    BACKEND="torch (nerfacc kernels unavailable)"
fi

run_step cuda_tests 180 "$PY" -m pytest -q -m cuda tests/ || true

# Wrapper: run a script in this interpreter and write torch's peak CUDA memory to a JSON file.
WRAP="$OUT/cuda_peak.py"
cat > "$WRAP" <<'EOF'
"""python cuda_peak.py OUT.json SCRIPT ARGS...: run SCRIPT as __main__, then write torch's
peak CUDA memory (MiB) to OUT.json. KNL_TORCH_MARCHER=1 hides nerfacc from the backend choice."""
import json, os, runpy, sys
import torch
out, script, *args = sys.argv[1:]
if os.environ.get("KNL_TORCH_MARCHER") == "1":
    import kilonerf_lbfgs.backends as backends
    backends.nerfacc_available = lambda: False
sys.argv = [script, *args]
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
finally:
    with open(out, "w") as f:
        json.dump({"max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
                   "max_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}, f)
sys.exit(code)
EOF
[[ "$BACKEND" == nerfacc ]] && export KNL_TORCH_MARCHER=0 || export KNL_TORCH_MARCHER=1

# nvidia-smi sampler (device-wide memory.used, MiB), if nvidia-smi is there
SAMPLER_PID=""
SMI_LOG="$OUT/nvidia_smi_memory.txt"
: > "$SMI_LOG"
stop_sampler() {
    if [[ -n "$SAMPLER_PID" ]]; then
        kill "$SAMPLER_PID" 2>/dev/null || true
        wait "$SAMPLER_PID" 2>/dev/null || true
        SAMPLER_PID=""
    fi
}
trap stop_sampler EXIT
if command -v nvidia-smi >/dev/null 2>&1; then
    ( while true; do
          nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null || true
          sleep 0.5
      done >> "$SMI_LOG" ) &
    SAMPLER_PID=$!
fi

# the scene: lego at 400x400 if its data is there, else the generated demo scene
if [[ -z "$DATADIR" ]]; then
    for cand in "$REPO/../shared/data/nerf_synthetic/lego" "$REPO/shared/data/nerf_synthetic/lego"; do
        if [[ -f "$cand/transforms_train.json" ]]; then DATADIR="$(cd "$cand" && pwd)"; break; fi
    done
fi
TRAIN_DIR="$OUT/train"
rm -f "$TRAIN_DIR/metrics.json" "$TRAIN_DIR/checkpoint.pt"
if [[ -n "$DATADIR" ]]; then
    SCENE="lego 400x400 (every 8th test view)"
    TRAIN_ARGS=(--config configs/lego.txt --datadir "$DATADIR" --img_wh 400 400 --test_every 8)
else
    SCENE="demo scene 64x64 (no lego data found; pass --datadir)"
    echo "gpu_check: no lego data (looked in ../shared/data and shared/data); training the demo scene"
    TRAIN_ARGS=(--config configs/demo.txt)
fi
run_step train $((SECONDS_TRAIN + 150)) "$PY" "$WRAP" "$OUT/peak_train.json" scripts/train_nerf.py \
    "${TRAIN_ARGS[@]}" --max_seconds "$SECONDS_TRAIN" --out_dir "$TRAIN_DIR" --no_progress \
    --device cuda || true

FPS="n/a"
if [[ -f "$TRAIN_DIR/checkpoint.pt" ]]; then
    if run_step render_800 120 "$PY" "$WRAP" "$OUT/peak_render.json" scripts/render_video.py \
        --ckpt "$TRAIN_DIR/checkpoint.pt" --n_frames "$FRAMES" --render_wh 800 800 \
        --out_dir "$OUT/video" --no_progress --device cuda; then
        FPS=$(sed -n 's/^wrote .* frames at 800x800 in .* s (\([0-9.]*\) fps).*/\1/p' \
              "$LOGS/render_800.log" | tail -n 1)
        FPS="${FPS:-n/a}"
    fi
else
    echo "gpu_check: no checkpoint from training; skipping the 800x800 render"
fi
stop_sampler

# ---------------------------------------------------------------- table
M="$TRAIN_DIR/metrics.json"
PSNR=$(json_get "$M" test_psnr .2f)
TSEC=$(json_get "$M" train_seconds .1f)
NTEST=$(json_get "$M" n_test_views d)
mem() { [[ -f "$1" ]] && json_get "$1" "$2" .0f || echo "n/a"; }
SMI_PEAK=$(sort -n "$SMI_LOG" 2>/dev/null | tail -n 1)
{
    echo "| $GPU_NAME | |"
    echo "| --- | --- |"
    echo "| scene | $SCENE |"
    echo "| ray-marching backend | $BACKEND |"
    echo "| test PSNR (dB, $NTEST views) | $PSNR |"
    echo "| train seconds (optimiser) | $TSEC |"
    echo "| render fps at 800x800 ($FRAMES-frame orbit, incl. MP4 encoding) | $FPS |"
    echo "| peak GPU memory, training (torch allocated / reserved, MiB) |" \
         "$(mem "$OUT/peak_train.json" max_allocated_mib) / $(mem "$OUT/peak_train.json" max_reserved_mib) |"
    echo "| peak GPU memory, 800x800 render (torch allocated / reserved, MiB) |" \
         "$(mem "$OUT/peak_render.json" max_allocated_mib) / $(mem "$OUT/peak_render.json" max_reserved_mib) |"
    echo "| peak GPU memory, device-wide (nvidia-smi memory.used, MiB) | ${SMI_PEAK:-n/a} |"
    echo "| CUDA tests | $(grep -E '(passed|failed|skipped|error)' "$LOGS/cuda_tests.log" 2>/dev/null | tail -n 1 || echo n/a) |"
    echo "| wall time of this check (s) | $((SECONDS - T_START)) |"
} > "$OUT/summary.md"
echo
cat "$OUT/summary.md"
echo
echo "(table also in $OUT/summary.md; logs in $LOGS)"
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "gpu_check: failed steps: ${FAILED[*]}" >&2
    exit 1
fi
