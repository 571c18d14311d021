#!/usr/bin/env bash
# The one prepared GPU check of dres_fast: install, run the Triton GPU tests, compare the Triton dot modes
# (accuracy and time), build the CUDA extension and run its tests, time both ops on every backend against
# their floors.
#
#   bash bench/gpu_check.sh              # all steps
#   STEPS="tests dots" bash bench/gpu_check.sh
#   GPU_CHECK_BUDGET=420 bash bench/gpu_check.sh
#
# Steps, in this order (most important first): install tests dots ext cudatests bench. Logs go to $OUT (if
# set) else bench/out/gpu_check. Without a GPU it prints "no GPU: skipping" and exits 0. The whole script
# stops starting steps after GPU_CHECK_BUDGET seconds (default 540: one device command may run 600 s and
# the whole device lease is 15 minutes, machine start included); each step also has its own cap, cut to
# what is left of the budget, so one slow step cannot eat the rest. A step that runs out of time gets
# SIGINT first (pytest still prints its summary). A failed or skipped step is reported in the table at
# the end and in the exit status.
set -euo pipefail

cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-bench/out/gpu_check}"
mkdir -p "$LOG_DIR"
STEPS="${STEPS:-install tests dots ext cudatests bench}"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-540}"

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "no GPU: skipping (nvidia-smi not found)"
    exit 0
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no GPU: skipping (torch.cuda.is_available() is False)"
    exit 0
fi
# compiled kernels, never the interpreter
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$LOG_DIR/gpu.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$LOG_DIR/gpu.txt"

SUMMARY=()
FAILED=0
run_step() {  # name, time limit (s), command...
    local name="$1" limit="$2"; shift 2
    case " $STEPS " in *" $name "*) ;; *) SUMMARY+=("$(printf '%-9s %-8s %6s' "$name" skipped -)"); return 0 ;; esac
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 30 ]; then
        SUMMARY+=("$(printf '%-9s %-8s %6s' "$name" no-time -)"); FAILED=1
        echo "=== $name: not started, ${left}s of the ${BUDGET}s budget left"
        return 0
    fi
    if [ "$limit" -gt "$left" ]; then limit=$left; fi
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS status=ok
    if ! timeout -s INT -k 20 "$limit" "$@" > >(tee "$LOG_DIR/$name.log") 2>&1; then status=FAILED; FAILED=1; fi
    SUMMARY+=("$(printf '%-9s %-8s %6ss' "$name" "$status" "$((SECONDS - start))")")
}

# 1. install without letting pip touch torch; the CUDA extension is built once, in step 4, verbosely
run_step install 120 env DRES_SKIP_CUDA=1 "$PY" -m pip install --no-deps --no-build-isolation -e .
if ! "$PY" -c "import dres_fast.kernels" 2>/dev/null; then
    # not installed (no wheel/setuptools, no network): map kernels/ to dres_fast.kernels as setup.py does
    echo "dres_fast.kernels not importable: using a source-tree shim (sitecustomize) instead of the install"
    SHIM="$LOG_DIR/shim"
    mkdir -p "$SHIM"
    cat >"$SHIM/sitecustomize.py" <<PYEOF
import importlib.abc, importlib.util, os, sys
class _KernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "dres_fast.kernels":
            return None
        root = os.path.join("$PWD", "kernels")
        return importlib.util.spec_from_file_location(
            name, os.path.join(root, "__init__.py"), submodule_search_locations=[root])
sys.meta_path.insert(0, _KernelsFinder())
PYEOF
    export PYTHONPATH="$SHIM:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# 2. GPU tests of the Triton backend (and of the ops through it). A fixed Triton config keeps them quick
#    (autotuning every test shape would take minutes); TestGPU.test_every_autotune_config runs each
#    autotuned tile once, and the autotuned kernels are checked against float64 in step 3. No -x: one
#    failure must not hide the others on a scarce device.
run_step tests 240 env DRES_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -rfEs tests/test_triton_backend.py -p no:cacheprovider

# 3. dot modes: fp32 error against float64 (ratio to torch's IEEE fp32 error; DESIGN.md 4 asks <= 2) and
#    time, for IEEE fp32 FMAs and 3-pass TF32; the fp16/bf16 split dots. K = N = 256, d = 2^16.
run_step dots 180 "$PY" - <<'EOF'
import os
import torch
import triton.testing
from types import SimpleNamespace
from dres_fast.ops.dispatch import backend_ops

# through the registered ops (the eager triton_op path users run): a direct dres_fast.kernels call launches
# through torch's wrap_triton HOP, whose per-launch Python cost would be timed with the kernel
_mix_op, _recon_op = backend_ops("triton", torch.device("cuda"))
k = SimpleNamespace(spline_mix=_mix_op, reconstruction_loss=_recon_op)

torch.backends.cuda.matmul.allow_tf32 = False
K = N = 256
d = 1 << 16
gen = torch.Generator(device="cuda").manual_seed(0)
decoder = (torch.randn(K, N, device="cuda", dtype=torch.float64, generator=gen) / N ** 0.5)
y_coded64 = torch.randn(N, d, device="cuda", dtype=torch.float64, generator=gen)
rows = []
for case, noise in (("random", None), ("cancel", 1e-3)):
    y64 = (decoder @ y_coded64 + noise * torch.randn(K, d, device="cuda", dtype=torch.float64, generator=gen)
           if noise else torch.randn(K, d, device="cuda", dtype=torch.float64, generator=gen))
    y, y_coded, dec = y64.float(), y_coded64.float(), decoder.float()
    r = y.double() - dec.double() @ y_coded.double()
    ref_loss = (r * r).mean()
    ref_gy = 2 * r / r.numel()
    ref_gyc = -dec.double().t() @ ref_gy
    rt = y - dec @ y_coded
    t_err = [abs((rt * rt).mean().double() - ref_loss).item() / ref_loss.item(),
             ((2 * rt / rt.numel()).double() - ref_gy).norm().item() / ref_gy.norm().item(),
             ((-dec.t() @ (2 * rt / rt.numel())).double() - ref_gyc).norm().item() / ref_gyc.norm().item()]
    for mode in ("ieee", "tf32x3"):
        os.environ["DRES_TRITON_FP32_DOT"] = mode
        loss, gy, gyc = k.reconstruction_loss(y, y_coded, dec, "mean", True)
        errs = [abs(loss.double() - ref_loss).item() / ref_loss.item(),
                (gy.double() - ref_gy).norm().item() / ref_gy.norm().item(),
                (gyc.double() - ref_gyc).norm().item() / ref_gyc.norm().item()]
        ms = triton.testing.do_bench(lambda: k.reconstruction_loss(y, y_coded, dec, "mean", True), return_mode="median")
        ms_mix = triton.testing.do_bench(lambda: k.spline_mix(dec, y_coded), return_mode="median")
        rows.append((case, "fp32", mode, errs, [e / max(t, 1e-300) for e, t in zip(errs, t_err)], ms, ms_mix))
os.environ.pop("DRES_TRITON_FP32_DOT")
for dtype in (torch.bfloat16, torch.float16):
    y = torch.randn(K, d, device="cuda", generator=gen).to(dtype)
    y_coded = y_coded64.to(dtype)
    dec = decoder.float()
    r = y.double() - dec.double() @ y_coded.double()
    loss, gy, gyc = k.reconstruction_loss(y, y_coded, dec, "mean", True)
    errs = [abs(loss.double() - (r * r).mean()).item() / (r * r).mean().item(),
            (gy.double() - 2 * r / r.numel()).norm().item() / (2 * r / r.numel()).norm().item(), float("nan")]
    ms = triton.testing.do_bench(lambda: k.reconstruction_loss(y, y_coded, dec, "mean", True), return_mode="median")
    ms_mix = triton.testing.do_bench(lambda: k.spline_mix(dec, y_coded), return_mode="median")
    rows.append(("random", str(dtype).split(".")[-1], "split3", errs, [float("nan")] * 3, ms, ms_mix))
print(f"{'case':7} {'dtype':9} {'dot':7} {'loss err':>9} {'gy err':>9} {'gyc err':>9} "
      f"{'x torch':>22} {'recon ms':>9} {'mix ms':>8}")
for case, dt, mode, errs, ratios, ms, ms_mix in rows:
    print(f"{case:7} {dt:9} {mode:7} " + " ".join(f"{e:9.2e}" for e in errs) + "  "
          + " ".join(f"{q:6.2f}" for q in ratios) + f"  {ms:9.3f} {ms_mix:8.3f}")
EOF

# 4. the CUDA extension (the CUDA backend's engineer provides dres_fast._cuda_ext), then its GPU tests and
#    the other tests that name cuda/gpu. After the Triton steps: a slow build must not starve them.
run_step ext 240 "$PY" -c "import dres_fast._cuda_ext as c; c.load(verbose=True)"
run_step cudatests 180 "$PY" -m pytest -q -rfEs tests -k "(gpu or cuda) and not test_triton_backend" -p no:cacheprovider

# 5. kernel timings: every available backend + torch.compile, each as a multiple of its floor
run_step bench 240 "$PY" -m bench.kernels --device cuda --full --out "$LOG_DIR/kernels.json"

echo
echo "=== gpu_check summary ($(head -n 2 "$LOG_DIR/gpu.txt" | tail -n 1))"
printf '%-9s %-8s %7s\n' step status time
for line in "${SUMMARY[@]}"; do echo "$line"; done | tee "$LOG_DIR/summary.txt"
if [ -f "$LOG_DIR/dots.log" ]; then echo; echo "dot modes:"; tail -n 7 "$LOG_DIR/dots.log"; fi
echo "logs: $LOG_DIR"
exit "$FAILED"
