#!/usr/bin/env bash
# The one prepared GPU check of dres_fast, one command on a GPU machine:
#
#   bash bench/gpu_check.sh                        # every step, at most GPU_CHECK_BUDGET seconds (480)
#   STEPS="deps install build tests" bash bench/gpu_check.sh
#   GPU_CHECK_BUDGET=300 KERNELS_MODE=quick CAP_tests=120 bash bench/gpu_check.sh
#
# Steps, ordered by value (a short budget keeps the most useful ones):
#   deps     the test/bench dependencies (numpy scipy pytest hypothesis mpmath ninja tqdm matplotlib) are
#            importable; missing ones are installed from wheels in .whl/ (no network on GPU boxes), else from
#            the index, always with torch pinned to the installed version (pip never touches torch)
#   install  pip install --no-deps --no-build-isolation -e . (the CUDA extension is built in the next step)
#   build    the CUDA extension, verbosely (skipped, not failed, when nvcc is missing)
#   cpp      whether a C++ TORCH_CHECK failure inside an extension reaches Python as a RuntimeError
#   tests    the GPU tests: Triton compiled kernels, the CUDA extension, the ops through both, torch.compile
#   dots     fp32 dot modes (ieee vs tf32x3): error against float64 relative to torch's own fp32 error,
#            and time; the fp16/bf16 split dots
#   kernels  python -m bench.kernels --device cuda: every backend and torch.compile against measured floors
#   cold     python -m bench.cold_start --device cuda: a fresh process's first DReS step on ResNet-18 with an empty
#            Triton cache (compile and autotune included; target under 10 s)
#   sweep    python -m bench.kernels --device cuda --sweep: d = 10 .. 2^20 at K = N = 256, and K = N = 4096 at
#            d = 10 and 1000 (the small-d cliffs)
#   overhead python -m bench.call_overhead --device cuda: host cost of one small-d forward + backward per backend,
#            eager road against registered ops against plain torch, and a cProfile of the slowest
#   steps    python -m bench --device cuda --skip-kernels: training steps (ResNet-18 and the small models)
# Each step has its own cap, cut to what is left of the budget, so one slow step cannot eat the rest; a step
# that runs out of time gets SIGINT first (pytest still prints its summary). Logs, per-step JSON and
# gpu_check.json (every step's status and time, the card, torch, Triton, nvcc) go to $OUT if set, else
# bench/out/gpu_check. The summary table is printed last. Without a GPU it prints "no GPU: skipping", exits 0.
set -uo pipefail

cd "$(dirname "$0")/.."
# With $OUT set (a remote GPU run), the logs go to a scratch folder and $OUT gets one archive of them plus
# the JSON summaries: a few files are easier to fetch back than a folder of logs.
if [ -n "${OUT:-}" ]; then LOG_DIR=$(mktemp -d); else LOG_DIR=bench/out/gpu_check; fi
mkdir -p "$LOG_DIR"
STEPS="${STEPS:-deps install build cpp tests dots kernels cold sweep overhead steps}"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-480}"
KERNELS_MODE="${KERNELS_MODE:-full}"

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "no GPU: skipping (nvidia-smi not found)"
    exit 0
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no GPU: skipping (torch.cuda.is_available() is False)"
    exit 0
fi
unset TRITON_INTERPRET          # compiled kernels, never the interpreter
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

"$PY" - <<'EOF' | tee "$LOG_DIR/gpu.txt"
import shutil, subprocess, torch
try:
    import triton; tv = triton.__version__
except Exception as exc:
    tv = f"missing ({exc})"
nvcc = shutil.which("nvcc")
nv = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1] if nvcc else "none"
print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {tv} | nvcc {nv}")
EOF

SUMMARY=()
JSON_ROWS=()
FAILED=0
run_step() {  # name, cap (s), command...
    local name="$1" limit="$2"; shift 2
    local override="CAP_$name"; limit="${!override:-$limit}"   # e.g. CAP_tests=120 overrides a step's cap
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    local left=$((BUDGET - SECONDS)) status=ok start=$SECONDS
    if [ "$left" -lt 20 ]; then
        status=no-time; FAILED=1
        echo "=== $name: not started, ${left}s of the ${BUDGET}s budget left"
    else
        [ "$limit" -gt "$left" ] && limit=$left
        echo "=== $name (cap ${limit}s): $*"
        # the step's own timeout: SIGINT first so pytest prints its summary, then SIGKILL
        timeout -s INT -k 15 "$limit" "$@" > >(tee "$LOG_DIR/$name.log") 2>&1; local rc=$?
        if [ "$rc" -eq 77 ]; then status=skipped
        elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=TIMEOUT; FAILED=1
        elif [ "$rc" -ne 0 ]; then status=FAILED; FAILED=1
        fi
    fi
    SUMMARY+=("$(printf '%-8s %-8s %5ss' "$name" "$status" "$((SECONDS - start))")")
    JSON_ROWS+=("{\"step\": \"$name\", \"status\": \"$status\", \"seconds\": $((SECONDS - start))}")
}

step_deps() {
    local missing
    missing=$("$PY" - <<'EOF'
import importlib
need = {"numpy": "numpy", "scipy": "scipy", "pytest": "pytest", "hypothesis": "hypothesis", "mpmath": "mpmath",
        "ninja": "ninja", "tqdm": "tqdm", "matplotlib": "matplotlib", "setuptools": "setuptools"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
    if [ -z "$missing" ]; then echo "all dependencies present"; return 0; fi
    echo "missing: $missing"
    local pin; pin=$(mktemp); "$PY" -c "import torch; print('torch==' + torch.__version__)" > "$pin"
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --find-links .whl -c "$pin" $missing
    else
        "$PY" -m pip install -q -c "$pin" $missing
    fi
}

step_build() {
    if ! command -v nvcc >/dev/null 2>&1; then
        echo "nvcc not found: the CUDA backend is not built; the Triton steps still run"
        return 77
    fi
    "$PY" -c "import dres_fast.backends.cuda as c; c.load(verbose=True); print('CUDA extension loaded')"
}

export PY; export -f step_deps step_build
run_step deps 90 bash -c step_deps
run_step install 90 env DRES_SKIP_CUDA=1 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
run_step build 180 bash -c step_build
run_step cpp 100 "$PY" -m bench.cpp_throw_probe
# Fixed Triton tiles keep the tests quick (every autotune config has its own test); no -x: one failure must
# not hide the others on a scarce device. With pytest-xdist a crashing test (a segfault in an extension) is
# reported and its worker replaced instead of ending the run. The op tests run every backend on the GPU; the
# CPU-toolchain, multi-process and slow tests ran in CI.
step_tests() {
    local parallel=()
    "$PY" -c "import xdist" 2>/dev/null && parallel=(-n 4)
    DRES_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -rfE -p no:cacheprovider "${parallel[@]}" -m "not slow" \
        tests/test_spline_mix.py tests/test_reconstruction_loss.py tests/test_triton_backend.py \
        tests/test_cuda_backend.py tests/test_cuda_adapter.py tests/test_compile.py tests/test_training_loops.py \
        tests/test_eager_path.py tests/test_kernel_paths.py \
        -k "not broken_file" --junitxml="$LOG_DIR/tests.xml"
}
export LOG_DIR; export -f step_tests
run_step tests 200 bash -c step_tests
run_step dots 90 "$PY" -m bench.dot_modes --out "$LOG_DIR/dots.json"
run_step kernels 150 "$PY" -m bench.kernels --device cuda "--$KERNELS_MODE" --out "$LOG_DIR/kernels.json"
run_step cold 100 "$PY" -m bench.cold_start --device cuda --timeout 30 --out "$LOG_DIR/cold.json"
run_step sweep 150 "$PY" -m bench.kernels --device cuda --sweep --out "$LOG_DIR/sweep.json"
run_step overhead 60 "$PY" -m bench.call_overhead --device cuda --out "$LOG_DIR/overhead.json"
run_step steps 120 "$PY" -m bench --device cuda --quick --skip-kernels --out "$LOG_DIR/bench"

( IFS=,; echo "{\"gpu\": \"$(head -n 1 "$LOG_DIR/gpu.txt" | sed 's/"/\\"/g')\", \"budget_s\": $BUDGET, \"steps\": [${JSON_ROWS[*]}]}" ) \
    > "$LOG_DIR/gpu_check.json"
if [ -n "${OUT:-}" ]; then
    tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$LOG_DIR" .
    for f in gpu_check.json kernels.json sweep.json dots.json cold.json overhead.json; do [ -f "$LOG_DIR/$f" ] && cp "$LOG_DIR/$f" "$OUT/"; done
fi
echo
for f in kernels sweep; do [ -f "$LOG_DIR/$f.log" ] && grep -E "^(op |-----|spline_mix|reconstruction_loss|    error|measured)" "$LOG_DIR/$f.log" | cut -c1-120; echo; done
if [ -f "$LOG_DIR/cpp.log" ]; then echo "cpp:"; cat "$LOG_DIR/cpp.log" | cut -c1-300; echo; fi
if [ -f "$LOG_DIR/dots.log" ]; then echo "dot modes:"; grep -A12 "^case" "$LOG_DIR/dots.log" | head -n 12; echo; fi
if [ -f "$LOG_DIR/overhead.log" ]; then echo "call overhead:"; sed -n 1,12p "$LOG_DIR/overhead.log" | cut -c1-160; echo; fi
if [ -f "$LOG_DIR/cold.log" ]; then echo "cold first step:"; grep -A6 "^backend" "$LOG_DIR/cold.log" | cut -c1-160; echo; fi
if [ -f "$LOG_DIR/tests.log" ]; then
    grep -E "^(FAILED|ERROR)" "$LOG_DIR/tests.log" | head -n 40 | cut -c1-220
    echo "tests: $(grep -E '(passed|failed|error)' "$LOG_DIR/tests.log" | tail -n 1)"
fi
echo "=== gpu_check summary: $(head -n 1 "$LOG_DIR/gpu.txt")"
printf '%-8s %-8s %6s\n' step status time
for line in "${SUMMARY[@]}"; do echo "$line"; done | tee "$LOG_DIR/summary.txt"
echo "logs: $LOG_DIR"
exit "$FAILED"
