#!/usr/bin/env bash
# Compile-check every csrc/*.cu with nvcc for sm_90 (Hopper) and sm_80 (Ampere), no GPU needed.
# Uses the defines torch's extension builder passes to nvcc (no implicit half conversions), writes
# object files to a temporary directory, prints one line per file, exits non-zero on any error or
# when ptxas reports register spills (-Xptxas -v: "N bytes spill stores" with N > 0) in any kernel.
# Runs one nvcc at a time (CI machines are small).
# Overrides: NVCC (compiler), CUDA_ARCHS (default "90 80"), CSRC_DIR (default csrc; the tests point
# it at a directory with a broken file to check that failures are reported).
set -uo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
if ! command -v "$NVCC" >/dev/null 2>&1; then
    echo "compile_cuda: nvcc not found (set NVCC or put the CUDA toolkit on PATH)" >&2
    exit 1
fi
out_dir="$(mktemp -d)"
trap 'rm -rf "$out_dir"' EXIT
csrc="${CSRC_DIR:-csrc}"
archs="${CUDA_ARCHS:-90 80}"
flags=(-std=c++17 -O3 "-I$csrc"
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
       -Xptxas -v)
arch_names=""
for arch in $archs; do
    flags+=("-gencode=arch=compute_$arch,code=sm_$arch")
    arch_names="$arch_names${arch_names:++}sm_$arch"
done
status=0
shopt -s nullglob
files=("$csrc"/*.cu)
if [ ${#files[@]} -eq 0 ]; then
    echo "compile_cuda: no $csrc/*.cu files" >&2
    exit 1
fi
for src in "${files[@]}"; do
    obj="$out_dir/$(basename "$src" .cu).o"
    start=$(date +%s)
    if log=$("$NVCC" "${flags[@]}" -c "$src" -o "$obj" 2>&1); then
        warnings=$(printf '%s\n' "$log" | grep -c "warning" || true)
        # ptxas -v prints, per kernel and architecture, a "Compiling entry function" line and then
        # "N bytes stack frame, S bytes spill stores, ..."
        spills=$(printf '%s\n' "$log" | grep -B1 -E "[1-9][0-9]* bytes spill stores" | grep -v "^--$" || true)
        if [ -n "$spills" ]; then
            echo "SPILL $src  $arch_names  $(( $(date +%s) - start )) s"
            printf '%s\n' "$spills"
            status=1
        else
            echo "OK    $src  $arch_names  $(( $(date +%s) - start )) s  ($warnings warnings, no spills)"
        fi
        [ "$warnings" -gt 0 ] && printf '%s\n' "$log" | grep -v "ptxas info\|bytes stack frame"
    else
        echo "FAIL  $src  $arch_names  $(( $(date +%s) - start )) s"
        printf '%s\n' "$log"
        status=1
    fi
done
exit $status
