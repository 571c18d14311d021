"""Compile every Triton kernel variant the backends can launch for sm_90 and sm_80, without a GPU.

For each variant (kernel x data dtype x dot mode x path x constexpr combination the launchers produce
x autotune config, plus the fixed config that ``DRES_TRITON_AUTOTUNE=0`` uses) this runs
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32))``,
then reads the cubin's resources back with ``cuobjdump --dump-resource-usage`` (registers, stack =
local memory per thread, which is where ptxas puts spills) and the shared memory from the compiled
kernel's metadata. ``CompiledKernel.n_regs`` / ``n_spills`` exist only after loading the binary on a
device, so they are not used here.

Arguments are specialised the way Triton's launcher specialises a typical call (Triton 3.6 and 3.9
agree): pointers 16-byte aligned, integer arguments equal to 1 become constexprs (unit strides of
contiguous tensors), the other integers divisible by 16 (K = N = 256, d = 2^16).

Exit status 1 when a variant fails to compile or when a variant the launchers use by default spills
(every config of a dtype's default dot mode: the autotuner may pick any of them, and the fixed
``DRES_TRITON_AUTOTUNE=0`` configs are among them). Opt-in modes (``DRES_TRITON_FP32_DOT=tf32x3``) are
reported but fail the run only with ``--strict``.

Usage: python .ci/triton_compile.py [--arch 90 80] [--filter SUBSTRING] [--strict] [--list]
Runs with the Triton it finds (CI: the newest Triton in .venv and Triton 3.6 in .venv-triton36).
"""

import argparse
import concurrent.futures
import importlib.util
import multiprocessing
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is the default

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_kernels():
    """kernels/ under its installed name dres_fast.kernels (its modules use relative imports)."""
    spec = importlib.util.spec_from_file_location(
        "dres_fast.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["dres_fast.kernels"] = module
    spec.loader.exec_module(module)
    return (sys.modules["dres_fast.kernels.spline_mix"], sys.modules["dres_fast.kernels.reconstruction_loss"],
            importlib.import_module("dres_fast.kernels.banded"))


SM, RL, BD = load_kernels()


def torch_dtype(name):
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}[name]

# data dtype -> (Triton pointer type of the data, of the compute-dtype operands, default dot mode)
DTYPES = {
    "fp32": ("*fp32", "*fp32", "ieee"),
    "fp16": ("*fp16", "*fp32", "split"),
    "bf16": ("*bf16", "*fp32", "split"),
    "fp64": ("*fp64", "*fp64", "fp64"),
}
OPT_IN_MODES = {"fp32": ["tf32x3"]}  # DRES_TRITON_FP32_DOT=tf32x3
GRAD_MODES = {RL.grad_dot_mode(mode) for _, _, mode in DTYPES.values()}


def cuobjdump_path():
    bundled = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if bundled.exists():
        return str(bundled)
    return shutil.which("cuobjdump")


def signature_for(fn, args, constexprs):
    """``args``: name -> Triton type string or an int; ints equal to 1 become constexprs (as at launch).
    Returns (signature, constexprs, attrs) in the ASTSource format of Triton 3.3 through 3.9."""
    signature, consts, attrs = {}, dict(constexprs), {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, int):
            if value == 1:
                signature[name] = "constexpr"
                consts[name] = 1
                continue
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = value
            if value.startswith("*"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resources(cubin, tmpdir):
    path = pathlib.Path(tmpdir) / "kernel.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([cuobjdump_path(), "--dump-resource-usage", str(path)], capture_output=True, text=True,
                         check=True).stdout
    match = RESOURCE.search(out)
    if match is None:
        raise RuntimeError(f"cuobjdump printed no resource line:\n{out}")
    regs, stack, _, local = (int(v) for v in match.groups())
    return regs, max(stack, local)


def spline_mix_variants():
    """Every launch of spline_mix_into (forward layout: W row-major, x contiguous), every config."""
    for dtype, (data_ptr, acc_ptr, default_mode) in DTYPES.items():
        for mode in [default_mode] + OPT_IN_MODES.get(dtype, []):
            for i, config in enumerate(SM.configs_for(mode)):
                # "split": W read as pre-split parts of the data dtype (as many as the output needs)
                parts = SM.split_parts(torch_dtype(dtype)) if mode == "split" else 0
                meta = dict(config.kwargs, BLOCK_K=SM.mix_block_k(mode), DOT_MODE=mode, W_PARTS=parts)
                args = dict(w_ptr=data_ptr if parts else acc_ptr, x_ptr=data_ptr, out_ptr=data_ptr,
                            w_unscale_ptr="*fp32" if parts else acc_ptr, M=256, K=256,
                            D=65536, stride_wm=256, stride_wk=1, stride_wp=65536 if parts else 0, stride_xk=65536,
                            stride_xd=1, stride_om=65536, scale="fp32")
                args.update({key: 256 for key in SM.AUTOTUNE_KEY_ARGS})
                # the gradient dot modes are launched by default too (tf32x3: fp16/bf16 grad_y_coded)
                default = mode == default_mode or mode in GRAD_MODES
                yield (f"spline_mix {dtype} {mode} cfg{i} {config_label(config)}",
                       SM._spline_mix_kernel, args, meta, config, default)


def reconstruction_variants():
    """Every launch of reconstruction_loss: both paths, every BLOCK_N the launcher derives from N, with
    and without gradients, every config (reconstruction_loss.launch_plans lists them)."""
    for dtype, (data_ptr, acc_ptr, default_mode) in DTYPES.items():
        for mode in [default_mode] + OPT_IN_MODES.get(dtype, []):
            for label, kernel, configs, constexprs, fp32_grad in RL.launch_plans(mode):
                for i, config in enumerate(configs):
                    parts = constexprs.get("DEC_PARTS", 0)  # the rows path's pre-split decoder
                    resident = kernel is RL._reconstruction_loss_kernel  # reads both the decoder and its parts
                    args = dict(y_ptr=data_ptr, yc_ptr=data_ptr,
                                dec_ptr=data_ptr if parts and not resident else acc_ptr,
                                dec_parts_ptr=data_ptr if parts else acc_ptr,
                                dec_unscale_ptr="*fp32" if parts else acc_ptr,
                                grad_y_ptr=data_ptr, grad_r_ptr=acc_ptr if fp32_grad else data_ptr,
                                grad_yc_ptr=data_ptr,
                                partial_ptr="*fp64", K=256, N=256, D=65536, stride_yk=65536, stride_yd=1,
                                stride_ck=65536, stride_cd=1, stride_dk=256, stride_dn=1,
                                stride_dp=65536 if parts else 0, grad_scale="fp32",
                                grad_scale_lo="fp32")
                    args.update({key: 256 for key in RL.AUTOTUNE_KEY_ARGS})
                    meta = dict(config.kwargs, **constexprs)
                    yield (f"recon {dtype} {mode} {label} cfg{i} {config_label(config)}",
                           kernel, args, meta, config, mode == default_mode)


def banded_variants():
    """Every launch of banded_apply: forward and transpose, with and without the refinement step, every data
    dtype, every warp count the launcher picks (BLOCK_D = 32 warps); x contiguous (stride_xd = 1 becomes a
    constexpr), n = p = 4096, d = 2^16."""
    for dtype, (data_ptr, _, _) in DTYPES.items():
        for warps in (1, 2, 4):
            for refine in (False, True):
                config = triton.Config({}, num_warps=warps, num_stages=1)
                common = dict(factor_ptr="*fp64", stencil_ptr="*fp64", index_ptr="*i64", chord_ptr="*fp64",
                              curv_ptr="*fp64", gather_ptr="*i64", q_ptr="*fp64", r_ptr="*fp64", lam_ptr="*fp64",
                              res_ptr="*fp64", n=4096, p=4096, d=65536)
                meta = dict(CHUNK=BD.CHUNK, BLOCK_R=BD.BLOCK_R, BLOCK_D=32 * warps, REFINE=refine)
                label = f"{dtype} [D{32 * warps} w{warps}]" + (" refined" if refine else "")
                args = dict(common, x_ptr=data_ptr, out_ptr=data_ptr, z_ptr="*fp64", stride_xr=65536, stride_xd=1)
                yield f"banded forward {label}", BD._banded_forward_kernel, args, meta, config, True
                args = dict(common, g_ptr=data_ptr, out_ptr=data_ptr, v_ptr="*fp64", pg_ptr="*fp64", b_ptr="*fp64",
                            stride_gr=65536, stride_gd=1)
                yield (f"banded transpose {label}", BD._banded_transpose_kernel, args,
                       dict(meta, SCATTER_CHUNK=BD.SCATTER_CHUNK), config, True)


def config_label(config):
    tiles = " ".join(f"{name.replace('BLOCK_', '')}{value}" for name, value in config.kwargs.items())
    return f"[{tiles} w{config.num_warps} s{config.num_stages}]"


VARIANTS = list(spline_mix_variants()) + list(reconstruction_variants()) + list(banded_variants())


def mma_family(ptx):
    """The matrix instruction families a kernel's dots compiled to: "wgmma" (Hopper's warpgroup MMA), "mma"
    (``mma.sync``), both ("mma+wgmma": a kernel with two dots of different tile shapes), or "fma" (no
    tensor-core instruction: IEEE fp32 dots). Two families may round a k-slice's sum differently, so the
    configs of one launch must agree (``mixed_families``)."""
    found = [name for name, pattern in (("mma", r"\bmma\.sync\."), ("wgmma", r"\bwgmma\.mma_async\."))
             if re.search(pattern, ptx)]
    return "+".join(found) or "fma"


def launch_group(name):
    """Variants that one launch may autotune between: the name without its config part."""
    return name.split(" cfg")[0]


def mixed_families(families):
    """``{(arch, launch group): {family: [variant names]}}`` -> one line per group whose configs compiled to
    more than one MMA family (two DDP ranks picking different configs could then differ in the last bits)."""
    return [f"sm_{arch} {group}: " + "; ".join(f"{fam} in {', '.join(names)}" for fam, names in sorted(by.items()))
            for (arch, group), by in sorted(families.items()) if len(by) > 1]


def compile_one(job):
    """Compile variant ``index`` for ``arch``; returns (arch, index, regs, spill, shared, mma family, error)."""
    arch, index = job
    name, fn, args, meta, config, default = VARIANTS[index]
    signature, consts, attrs = signature_for(fn, args, meta)
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
        with tempfile.TemporaryDirectory() as tmpdir:
            regs, spill = resources(compiled.asm["cubin"], tmpdir)
        return arch, index, regs, spill, compiled.metadata.shared, mma_family(compiled.asm["ptx"]), None
    except Exception as exc:  # reported, then exit 1
        return arch, index, 0, 0, 0, "", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", type=int, default=[90, 80])
    parser.add_argument("--filter", default="", help="only variants whose name contains this")
    parser.add_argument("--strict", action="store_true", help="opt-in dot modes must not spill either")
    parser.add_argument("--list", action="store_true", help="list the variants, compile nothing")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    opts = parser.parse_args()
    if cuobjdump_path() is None:
        print("triton_compile: cuobjdump not found (neither bundled with Triton nor on PATH)", file=sys.stderr)
        return 1
    chosen = [i for i, v in enumerate(VARIANTS) if opts.filter in v[0]]
    print(f"triton {triton.__version__}: {len(chosen)} variants x sm_{'/sm_'.join(map(str, opts.arch))}, "
          f"{opts.jobs} jobs")
    if opts.list:
        for i in chosen:
            print(VARIANTS[i][0])
        return 0
    jobs = [(arch, i) for arch in opts.arch for i in chosen]
    failures, spills, families, start = [], [], {}, time.time()
    print(f"{'arch':>6} {'regs':>4} {'spill':>5} {'smem':>6} {'mma':>5}  variant")
    if opts.jobs > 1:
        pool = concurrent.futures.ProcessPoolExecutor(opts.jobs, mp_context=multiprocessing.get_context("fork"))
        results = pool.map(compile_one, jobs)
    else:
        pool, results = None, map(compile_one, jobs)
    for arch, index, regs, spill, shared, family, error in results:
        name, default = VARIANTS[index][0], VARIANTS[index][5]
        if error:
            failures.append(f"sm_{arch} {name}: {error}")
            print(f"sm_{arch} FAIL {name}: {error}", flush=True)
            continue
        flag = ""
        if spill:
            flag = "  SPILLS" + ("" if default or opts.strict else " (opt-in mode)")
            if default or opts.strict:
                spills.append(f"sm_{arch} {name}: {spill} bytes")
        families.setdefault((arch, launch_group(name)), {}).setdefault(family, []).append(name.split(" cfg")[-1])
        print(f"sm_{arch} {regs:4d} {spill:5d} {shared:6d} {family:>5}  {name}{flag}", flush=True)
    if pool is not None:
        pool.shutdown()
    mixed = mixed_families(families)
    print(f"{len(jobs)} compiles in {time.time() - start:.0f} s; "
          f"{len(failures)} failure(s), {len(spills)} spilling default variant(s), "
          f"{len(mixed)} launch(es) whose configs mix MMA families")
    for line in failures + spills + mixed:
        print("  " + line)
    return 1 if failures or spills or mixed else 0


if __name__ == "__main__":
    sys.exit(main())
