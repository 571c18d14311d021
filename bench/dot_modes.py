"""``python -m bench.dot_modes [--out FILE.json]`` (CUDA only): which fp32 dot mode the Triton kernels may use.

The accuracy rule (docs/DESIGN.md, section 4): for fp32 inputs a backend's error against a float64 computation of
the same inputs must be at most twice the torch fp32 backend's own error. For K = N = 256, d = 2^16 this times
``reconstruction_loss`` (loss and both gradients in one pass) and ``spline_mix`` through the registered Triton ops,
with IEEE fp32 dots (``ieee``) and 3-pass TF32 (``tf32x3``), on random data and on a nearly-smooth case where
``y`` is within 1e-3 of ``D y_coded`` (cancellation), and reports each error as a multiple of torch's. The
fp16/bf16 split-weight dots are timed and checked against float64 too, on both paths. With ``ieee`` both reconstruction
paths are measured (``DRES_TRITON_RECON_PATH``: the fused "resident" kernel and the two-launch "rows" path,
the default for ``ieee`` since the fused kernel was 3.5x its floor on the H200).
"""
from __future__ import annotations

import argparse
import json
import os

import torch


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def run(K=256, N=256, d=1 << 16, out=None):
    """The rows; with ``out``, the JSON so far is rewritten after every row (a cut-off run keeps them)."""
    import triton.testing

    from dres_fast.ops.dispatch import registered_ops

    mix, recon = registered_ops("triton", torch.device("cuda"))
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    decoder = torch.randn(K, N, device="cuda", dtype=torch.float64, generator=gen) / N ** 0.5
    y_coded64 = torch.randn(N, d, device="cuda", dtype=torch.float64, generator=gen)
    rows = []

    def measure(case, dtype_name, mode, y, y_coded, dec, torch_errs, path="auto"):
        os.environ["DRES_TRITON_RECON_PATH"] = path
        r = y.double() - dec.double() @ y_coded.double()
        ref = ((r * r).mean(), 2 * r / r.numel())
        ref_gyc = -dec.double().t() @ ref[1]
        loss, gy, gyc = recon(y, y_coded, dec, "mean", True)
        errs = [abs(loss.double() - ref[0]).item() / ref[0].item(), _rel(gy, ref[1]), _rel(gyc, ref_gyc)]
        row = {
            "case": case, "dtype": dtype_name, "dot": mode, "path": path, "errors": errs,
            "x_torch": [e / max(t, 1e-300) for e, t in zip(errs, torch_errs)] if torch_errs else None,
            "recon_ms": triton.testing.do_bench(lambda: recon(y, y_coded, dec, "mean", True), return_mode="median"),
            "mix_ms": triton.testing.do_bench(lambda: mix(dec, y_coded), return_mode="median"),
        }
        rows.append(row)
        print(format_rows([row]).splitlines()[-1], flush=True)  # a timed-out run still shows what it measured
        if out:
            _write(out, rows)

    for case, noise in (("random", None), ("cancel", 1e-3)):
        y64 = (decoder @ y_coded64 + noise * torch.randn(K, d, device="cuda", dtype=torch.float64, generator=gen)
               if noise else torch.randn(K, d, device="cuda", dtype=torch.float64, generator=gen))
        y, y_coded, dec = y64.float(), y_coded64.float(), decoder.float()
        r64 = y.double() - dec.double() @ y_coded.double()
        rt = y - dec @ y_coded  # torch's fp32 (cuBLAS, TF32 off)
        torch_errs = [abs((rt * rt).mean().double() - (r64 * r64).mean()).item() / (r64 * r64).mean().item(),
                      _rel(2 * rt / rt.numel(), 2 * r64 / r64.numel()),
                      _rel(-dec.t() @ (2 * rt / rt.numel()), -dec.double().t() @ (2 * r64 / r64.numel()))]
        for mode, path in (("ieee", "rows"), ("ieee", "resident"), ("tf32x3", "auto")):
            os.environ["DRES_TRITON_FP32_DOT"] = mode
            measure(case, "float32", mode, y, y_coded, dec, torch_errs, path)
    os.environ.pop("DRES_TRITON_FP32_DOT", None)
    for dtype in (torch.bfloat16, torch.float16):
        y = torch.randn(K, d, device="cuda", generator=gen).to(dtype)
        # both paths: "split" fits N = 256 on-chip (pre-split D) but auto takes "rows" there until timed
        for path in ("rows", "resident"):
            measure("random", str(dtype).split(".")[-1], "split", y, y_coded64.to(dtype), decoder.float(), None, path)
    os.environ.pop("DRES_TRITON_RECON_PATH", None)
    return rows


def format_rows(rows):
    lines = [f"{'case':7} {'dtype':9} {'dot':7} {'path':8} {'loss err':>9} {'gy err':>9} {'gyc err':>9} "
             f"{'x torch (loss gy gyc)':>22} {'recon ms':>9} {'mix ms':>8}"]
    for r in rows:
        ratios = " ".join(f"{q:6.2f}" for q in r["x_torch"]) if r["x_torch"] else f"{'-':>20}"
        lines.append(f"{r['case']:7} {r['dtype']:9} {r['dot']:7} {r.get('path', 'auto'):8} "
                     + " ".join(f"{e:9.2e}" for e in r["errors"])
                     + f"  {ratios}  {r['recon_ms']:9.3f} {r['mix_ms']:8.3f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.dot_modes", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.dot_modes needs a CUDA GPU")
    print(format_rows([]))
    run(out=args.out)


def _write(path, rows):
    with open(path + ".tmp", "w") as fh:  # renamed into place: a kill never leaves half a file
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, fh, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
