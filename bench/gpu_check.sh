#!/usr/bin/env bash
# shellcheck disable=SC2329  # the step_* functions run through bash -c "step_$name" (exported)
# The one prepared GPU check of dres_fast, one command on a GPU machine:
#
#   bash bench/gpu_check.sh                              # the default steps within GPU_CHECK_BUDGET_S (480 s)
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh          # print the plan (steps and caps) and stop
#   STEPS="deps build tests" bash bench/gpu_check.sh     # a subset (always run in the order below)
#   GPU_CHECK_BUDGET_S=600 STEPS="+dots" CAP_tests=150 bash bench/gpu_check.sh   # "+name": added to the default
#
# Steps, in the order they run (most useful first: a kill keeps what finished). * = opt-in (not in the default):
#   probe    the card, torch, Triton and nvcc (no GPU: prints "no GPU: skipping" and exits 0)
#   deps     the test/bench dependencies (numpy scipy pytest hypothesis mpmath ninja tqdm matplotlib) are
#            importable; missing ones are installed from wheels in .whl/ (no network on GPU boxes), else from
#            the index, always with torch pinned to the installed version (pip never touches torch)
#   install  pip install --no-deps --no-build-isolation -e . (the CUDA extension is built in the next step)
#   build    the CUDA extension, verbosely (skipped, not failed, when nvcc is missing)
#   cpp*     python -m bench.cpp_throw_probe: does a C++ TORCH_CHECK failure reach Python (answered: RESULTS.md)
#   tests    the GPU tests (Triton compiled kernels, the CUDA extension, the ops through both, torch.compile),
#            fixed Triton tiles, no -x; under pytest-xdist (-p xdist -n 2) when it is installed, so a crashing
#            test costs its worker, not the run; without it, one pytest process per file
#   kernels  python -m bench.kernels --sweep: reconstruction_loss, then spline_mix rows, every backend, fp32
#            and bf16, d = 10 .. 2^20 at K = N = 256 and K = N = 4096 at d = 10 and 1000 (JSON after every row)
#   banded*  python -m bench.banded --device cuda --quick: dense vs banded spline paths, K = N in {256, 1024,
#            4096} x d in {2^10, 2^14, 2^18} (rows over 2^28 elements left out), JSON at the end
#   dots*    python -m bench.dot_modes: fp32 dot modes (ieee, tf32x3) and the fp16/bf16 split dots, d = 2^16
#   overhead python -m bench.call_overhead: host cost of one small-d forward + backward per backend and road
#   cold     python -m bench.cold_start: a fresh process's first DReS step with an empty Triton cache
#   steps*   python -m bench --quick --skip-kernels: training steps (ResNet-18 and the small models)
#   compile  python -m bench.kernels --full --compile only: the torch_compile rows (one cold compile each) at
#            d = 2^16 and 2^20; the last step also gets the time that the earlier ones left unused
# The plan: the selected steps and their caps (CAP_<step>=seconds overrides one). The caps must add up to at
# most 90% of the budget (the rest covers start-up and copying); a step that does not fit is dropped (it
# says which), so the plan always fits. A step past its cap gets SIGINT (pytest and the benchmarks then print
# what they have), then SIGKILL 5 s later.
# Output: $OUT if set (a remote GPU run: only what is under $OUT comes back, at most 8 files), else
# bench/out/gpu_check. After EVERY step $OUT gets gpu_check.json (plan, budget, each finished step's status
# and time, the card), summary.txt (the table and digests so far) and gpu_check_logs.tar.gz (every finished
# step's log and files); the running step's output goes to $OUT/live.log as it is printed; kernels.json,
# compile.json (a row at a time) and cold.json (a case at a time) are written in $OUT directly. A kill at
# any moment so keeps every finished step and what the running one had printed or written.
# Test hooks: GPU_CHECK_PY (else PYTHON, else python3) is the Python every step runs; GPU_CHECK_DRY_RUN=1.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1

ORDER=(probe deps install build cpp tests kernels banded dots overhead cold steps compile)
DEFAULT_STEPS="deps install build tests kernels overhead cold compile"
declare -A CAP=([probe]=15 [deps]=15 [install]=20 [build]=90 [cpp]=75 [tests]=100 [kernels]=70 [banded]=60 [dots]=45
                [overhead]=30 [cold]=60 [steps]=100 [compile]=20)
GRACE=5          # seconds between a step's SIGINT and its SIGKILL, inside its cap
MIN_STEP=10      # a step with less time than this left is not started
BUDGET="${GPU_CHECK_BUDGET_S:-${GPU_CHECK_BUDGET:-480}}"
PY="${GPU_CHECK_PY:-${PYTHON:-python3}}"
KERNELS_MODE="${KERNELS_MODE:-sweep}"
TEST_WORKERS="${GPU_CHECK_TEST_WORKERS:-2}"

fail_plan() { echo "gpu_check: $*" >&2; exit 2; }
case "$BUDGET" in ''|*[!0-9]*) fail_plan "GPU_CHECK_BUDGET_S must be whole seconds, not '$BUDGET'" ;; esac
DEADLINE=$((BUDGET * 90 / 100))  # every step ends by then

STEPS="${STEPS:-$DEFAULT_STEPS}"
case "$STEPS" in +*) STEPS="$DEFAULT_STEPS ${STEPS//+/}" ;; esac
for s in $STEPS; do
    [ -n "${CAP[$s]:-}" ] || fail_plan "unknown step '$s' in STEPS (known: ${ORDER[*]})"
done
PLAN=() DROPPED=() PLANNED=0
for s in "${ORDER[@]}"; do
    [ "$s" = probe ] || case " $STEPS " in *" $s "*) ;; *) continue ;; esac
    override="CAP_$s"; cap="${!override:-${CAP[$s]}}"
    case "$cap" in ''|*[!0-9]*) fail_plan "$override must be whole seconds, not '$cap'" ;; esac
    CAP[$s]=$cap
    if [ $((PLANNED + cap)) -le "$DEADLINE" ]; then PLAN+=("$s"); PLANNED=$((PLANNED + cap)); else DROPPED+=("$s"); fi
done
[ "${PLAN[0]:-}" = probe ] || fail_plan "a budget of ${BUDGET}s leaves no room for the probe (cap ${CAP[probe]}s)"
LAST="${PLAN[${#PLAN[@]}-1]}"

echo "=== gpu_check plan: budget ${BUDGET} s; the steps end by ${DEADLINE} s (90%)"
for s in "${PLAN[@]}"; do
    note=""; [ "$s" = "$LAST" ] && [ "$s" != probe ] && note="   (and whatever time the earlier steps leave)"
    printf 'plan %-9s %4d s%s\n' "$s" "${CAP[$s]}" "$note"
done
printf 'plan %-9s %4d s of %d s (%d%% of the budget)\n' total "$PLANNED" "$BUDGET" $((PLANNED * 100 / BUDGET))
[ "${#DROPPED[@]}" -eq 0 ] || echo "dropped (no room in the budget): ${DROPPED[*]}"
if [ -n "${GPU_CHECK_DRY_RUN:-}" ] && [ "${GPU_CHECK_DRY_RUN}" != 0 ]; then exit 0; fi

# OUT_DIR gets the results (flat, few files: see above); LOG_DIR the logs and files of finished steps.
if [ -n "${OUT:-}" ]; then
    OUT_DIR="$OUT"; LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 1
else
    OUT_DIR=bench/out/gpu_check; LOG_DIR="$OUT_DIR/logs"
fi
mkdir -p "$OUT_DIR" "$LOG_DIR" || exit 1
LIVE="$OUT_DIR/live.log"
rm -f "$LIVE" "$OUT_DIR"/{kernels,compile,cold,banded}.json "$OUT_DIR"/*.tmp
unset TRITON_INTERPRET          # compiled kernels, never the interpreter
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PY LOG_DIR OUT_DIR KERNELS_MODE TEST_WORKERS

GPU_LINE="(not probed)"
ROWS=()          # name status seconds limit, one per finished step
FAILED=0

json_str() { sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' -e 's/\t/ /g' <<<"$1" | tr -d '\n'; }

digest() {  # the figures of the finished steps, from their logs
    local f="$LOG_DIR"
    if [ -f "$f/tests.log" ]; then
        echo "tests: $(grep -hE '(passed|failed|error)' "$f/tests.log" | grep -vE '^(FAILED|ERROR)' \
            | tail -n 3 | tr '\n' ' ')"
        grep -hE "^(FAILED|ERROR)" "$f/tests.log" | head -n 40 | cut -c1-220
        echo
    fi
    for s in kernels compile; do
        [ -f "$f/$s.log" ] || continue
        echo "$s:"
        grep -E "^(op |-----|spline_mix|reconstruction_loss|    error|measured|interrupted)" "$f/$s.log" | cut -c1-120
        echo
    done
    if [ -f "$f/cpp.log" ]; then echo "cpp:"; cut -c1-300 "$f/cpp.log"; echo; fi
    if [ -f "$f/dots.log" ]; then echo "dot modes:"; grep -A12 "^case" "$f/dots.log" | head -n 13; echo; fi
    if [ -f "$f/overhead.log" ]; then echo "call overhead:"; sed -n 1,12p "$f/overhead.log" | cut -c1-160; echo; fi
    if [ -f "$f/cold.log" ]; then echo "cold first step:"; grep -A6 "^backend" "$f/cold.log" | cut -c1-160; echo; fi
}

summary() {  # the table so far, then the digests
    local row name status secs limit
    echo "=== gpu_check summary: $GPU_LINE"
    echo "budget ${BUDGET} s, plan ${PLANNED} s, elapsed ${SECONDS} s"
    printf '%-9s %-8s %6s %6s\n' step status time limit
    for row in "${ROWS[@]}"; do
        read -r name status secs limit <<<"$row"
        printf '%-9s %-8s %5ss %5ss\n' "$name" "$status" "$secs" "$limit"
    done
    local done_steps=" ${ROWS[*]%% *} " rest=()
    for name in "${PLAN[@]}"; do case "$done_steps" in *" $name "*) ;; *) rest+=("$name") ;; esac; done
    [ "${#rest[@]}" -eq 0 ] || echo "not run (yet): ${rest[*]}"
    [ "${#DROPPED[@]}" -eq 0 ] || echo "dropped (no room in the budget): ${DROPPED[*]}"
    echo
    digest
}

write_json() {
    local row name status secs limit sep="" plan="" steps="" dropped=""
    for name in "${PLAN[@]}"; do plan+="$sep{\"step\": \"$name\", \"cap_s\": ${CAP[$name]}}"; sep=", "; done
    sep=""; for name in "${DROPPED[@]}"; do dropped+="$sep\"$name\""; sep=", "; done
    sep=""
    for row in "${ROWS[@]}"; do
        read -r name status secs limit <<<"$row"
        steps+="$sep{\"step\": \"$name\", \"status\": \"$status\", \"seconds\": $secs, \"limit_s\": $limit}"; sep=", "
    done
    local fmt='{"gpu": "%s", "budget_s": %d, "deadline_s": %d, "planned_s": %d, "elapsed_s": %d, "finished": %s,\n'
    printf "$fmt"' "plan": [%s],\n "dropped": [%s],\n "steps": [%s]}\n' \
        "$(json_str "$GPU_LINE")" "$BUDGET" "$DEADLINE" "$PLANNED" "$SECONDS" "${1:-false}" "$plan" "$dropped" "$steps"
}

sync_out() {  # after every step: what finished is in OUT_DIR before the next step starts
    write_json "${1:-false}" > "$LOG_DIR/gpu_check.json"
    summary > "$LOG_DIR/summary.txt" 2>/dev/null
    cp -f "$LOG_DIR/gpu_check.json" "$LOG_DIR/summary.txt" "$OUT_DIR/" 2>/dev/null
    if [ "$OUT_DIR" != "${LOG_DIR%/logs}" ]; then  # a renamed complete archive: a kill mid-tar keeps the last one
        tar -czf "$OUT_DIR/gpu_check_logs.part" -C "$LOG_DIR" . 2>/dev/null \
            && mv -f "$OUT_DIR/gpu_check_logs.part" "$OUT_DIR/gpu_check_logs.tar.gz"
        rm -f "$OUT_DIR/gpu_check_logs.part"
    fi
}

run_step() {  # name: runs step_<name> under its cap, output to $LIVE (and stdout), then the log to LOG_DIR
    local name="$1" limit status=ok start=$SECONDS rc
    limit=$((DEADLINE - SECONDS))
    [ "$name" = "$LAST" ] || [ "${CAP[$name]}" -ge "$limit" ] || limit=${CAP[$name]}
    if [ "$limit" -lt "$MIN_STEP" ]; then
        status=no-time; FAILED=1
        echo "=== $name: not started, ${limit}s left before the ${DEADLINE}s deadline"
    else
        echo "=== $name (limit ${limit}s, at ${SECONDS}s)"
        # SIGINT at limit - GRACE (pytest prints its summary, the benchmarks their rows), SIGKILL at limit
        GPU_CHECK_STEP="$name" STEP_LIMIT="$limit" timeout -s INT -k "$GRACE" "$((limit - GRACE))" \
            bash -c "step_$name" </dev/null 2>&1 | tee "$LIVE"
        rc=${PIPESTATUS[0]}
        if [ "$rc" -eq 77 ]; then status=skipped
        elif [ "$rc" -eq 3 ] && [ "$name" = probe ]; then status=no-gpu; FAILED=0
        elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=TIMEOUT; FAILED=1
        elif [ "$rc" -ne 0 ]; then status=FAILED; FAILED=1
        fi
        mv -f "$LIVE" "$LOG_DIR/$name.log"
    fi
    ROWS+=("$name $status $((SECONDS - start)) $limit")
    sync_out
}

step_probe() {
    "$PY" - <<'EOF'
import shutil, subprocess, sys
import torch
if not torch.cuda.is_available():
    print("no GPU: torch.cuda.is_available() is False")
    sys.exit(3)
try:
    import triton; tv = triton.__version__
except Exception as exc:
    tv = f"missing ({exc})"
nvcc = shutil.which("nvcc")
nv = (subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines() or ["?"])[-1] \
    if nvcc else "none"
print(f"gpu: {torch.cuda.get_device_name()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {tv}"
      f" | nvcc {nv}")
EOF
}

step_deps() {
    local missing pin
    missing=$("$PY" - <<'EOF'
import importlib.util
need = {"numpy": "numpy", "scipy": "scipy", "pytest": "pytest", "hypothesis": "hypothesis", "mpmath": "mpmath",
        "ninja": "ninja", "tqdm": "tqdm", "matplotlib": "matplotlib", "setuptools": "setuptools"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
) || return 1
    if [ -z "$missing" ]; then echo "all dependencies present"; return 0; fi
    echo "missing: $missing"
    local -a pkgs; read -ra pkgs <<<"$missing"
    pin=$(mktemp); "$PY" -c "import torch; print('torch==' + torch.__version__)" > "$pin"
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --find-links .whl -c "$pin" "${pkgs[@]}"
    else
        "$PY" -m pip install -q -c "$pin" "${pkgs[@]}"
    fi
}

step_install() { DRES_SKIP_CUDA=1 "$PY" -m pip install -q --no-deps --no-build-isolation -e .; }

step_build() {
    if ! command -v nvcc >/dev/null 2>&1; then
        echo "nvcc not found: the CUDA backend is not built; the Triton steps still run"
        return 77
    fi
    "$PY" -c "import dres_fast.backends.cuda as c; c.load(verbose=True); print('CUDA extension loaded')"
}

step_cpp() { "$PY" -m bench.cpp_throw_probe; }

# Fixed Triton tiles keep the tests quick (every autotune config has its own test); no -x: one failure must
# not hide the others on a scarce device. The CPU-toolchain, multi-process and slow tests ran in CI.
TEST_FILES="tests/test_reconstruction_loss.py tests/test_spline_mix.py tests/test_triton_backend.py
tests/test_cuda_backend.py tests/test_cuda_adapter.py tests/test_kernel_paths.py tests/test_eager_path.py
tests/test_training_loops.py tests/test_compile.py tests/test_banded.py tests/test_banded_triton.py
tests/test_banded_cuda.py"
export TEST_FILES
step_tests() {
    local -a files opts=(-q -rfE -p no:cacheprovider -m "not slow" -k "not broken_file")
    local f rc=0
    read -ra files <<<"${TEST_FILES//$'\n'/ }"
    export DRES_TRITON_AUTOTUNE=0
    if "$PY" -c "import xdist" 2>/dev/null; then
        # a crashing test (a segfault in an extension) is reported and its worker replaced
        "$PY" -m pytest "${opts[@]}" -p xdist -n "$TEST_WORKERS" "${files[@]}" --junitxml="$LOG_DIR/tests.xml"
        return
    fi
    echo "pytest-xdist not installed: one pytest process per file"
    for f in "${files[@]}"; do
        echo "--- $f"
        "$PY" -m pytest "${opts[@]}" "$f" --junitxml="$LOG_DIR/tests-$(basename "$f" .py).xml" || rc=1
    done
    return "$rc"
}

step_kernels() { "$PY" -m bench.kernels --device cuda "--$KERNELS_MODE" --compile skip --out "$OUT_DIR/kernels.json"; }
step_banded() { "$PY" -m bench.banded --device cuda --quick --out "$OUT_DIR/banded.json"; }
step_dots() { "$PY" -m bench.dot_modes --out "$LOG_DIR/dots.json"; }
step_overhead() { "$PY" -m bench.call_overhead --device cuda --out "$LOG_DIR/overhead.json"; }
step_cold() {  # three cases, each a fresh process: a third of the step's time each
    local per=$(((STEP_LIMIT - GRACE - 2) / 3)); [ "$per" -ge 5 ] || per=5
    "$PY" -m bench.cold_start --device cuda --timeout "$per" --out "$OUT_DIR/cold.json"
}
step_steps() { "$PY" -m bench --device cuda --quick --skip-kernels --out "$LOG_DIR/bench"; }
step_compile() { "$PY" -m bench.kernels --device cuda --full --compile only --out "$OUT_DIR/compile.json"; }
export GRACE
export -f step_probe step_deps step_install step_build step_cpp step_tests step_kernels step_banded step_dots \
    step_overhead step_cold step_steps step_compile

# The probe decides whether there is a GPU at all (it exits 3 when torch sees none).
run_step probe
probe_status="${ROWS[0]#probe }"; probe_status="${probe_status%% *}"
GPU_LINE=$(sed -n 's/^gpu: //p' "$LOG_DIR/probe.log" 2>/dev/null | tail -n 1)
if [ "$probe_status" = no-gpu ]; then
    GPU_LINE=none; sync_out true
    echo "no GPU: skipping ($(sed -n 's/^no GPU: //p' "$LOG_DIR/probe.log" | head -n 1))"; exit 0
elif [ "$probe_status" != ok ]; then
    sync_out true; echo "gpu_check: the probe failed ($probe_status); see $LOG_DIR/probe.log"; exit 1
fi
for s in "${PLAN[@]:1}"; do run_step "$s"; done
sync_out true

echo
summary
echo "results: $OUT_DIR (logs: $LOG_DIR)"
exit "$FAILED"
