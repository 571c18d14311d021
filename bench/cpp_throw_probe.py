"""``python -m bench.cpp_throw_probe``: does a C++ error raised inside a torch extension reach Python?

The first GPU run (H200, torch 2.11) died with a segmentation fault, not a RuntimeError, when the CUDA extension's
argument checks (``TORCH_CHECK``) failed. This probe separates the causes: it builds a minimal C++-only torch op
whose only job is to fail a ``TORCH_CHECK``, once with the compiler torch's extension builder picks (``CXX`` or
``c++``) and once with each other ``g++`` on the machine, and calls each, and dres_fast's own op with a bad
argument, in a fresh subprocess, reporting ``RuntimeError`` (good) or the signal that killed it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

SOURCE = r"""
#include <torch/extension.h>
at::Tensor always_fails(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 99, "probe: x must be 99-D, got ", x.dim());
  return x;
}
TORCH_LIBRARY(dres_probe, m) { m.def("always_fails(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(dres_probe, CompositeExplicitAutograd, m) { m.impl("always_fails", &always_fails); }
"""

CALL_PROBE = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
try:
    torch.ops.dres_probe.always_fails(torch.ones(2))
except RuntimeError as err:
    print("RuntimeError:", str(err).splitlines()[0])
"""

CALL_DRES = r"""
import torch, dres_fast.backends.cuda as c
ops = c.load()
w = torch.ones(3, 3, device="cuda")
for name, x in (("x on CPU", torch.ones(3, 4)), ("K mismatch", torch.ones(5, 4, device="cuda")),
                ("int32 x", torch.ones(3, 4, device="cuda", dtype=torch.int32))):
    try:
        torch.ops.dres_fast_C.spline_mix(w, x)
        print(name, ": no error")
    except RuntimeError as err:
        print(name, ": RuntimeError:", str(err).splitlines()[0][:100])
"""


def _run(args, env=None):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=240)
    if proc.returncode < 0:
        return f"crashed (signal {-proc.returncode})"
    return (proc.stdout.strip() or proc.stderr.strip()[-300:]) or f"exit {proc.returncode}"


def main():
    compilers = [os.environ.get("CXX") or shutil.which("c++") or "c++"]
    for extra in ("/usr/bin/g++", shutil.which("g++")):
        if extra and os.path.exists(extra) and os.path.realpath(extra) not in map(os.path.realpath, compilers):
            compilers.append(extra)
    for cxx in compilers:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
        build_dir = tempfile.mkdtemp(prefix="dres_probe_")
        build = ("import sys, torch.utils.cpp_extension as e; "
                 f"lib = e.load_inline('dres_probe_{abs(hash(cxx)) % 10**6}', cpp_sources=[{SOURCE!r}], "
                 f"build_directory={build_dir!r}, is_python_module=False, verbose=False); print(lib)")
        env = dict(os.environ, CXX=cxx)
        built = _run(["-c", build], env=env)
        lib = built.splitlines()[-1] if built.endswith(".so") else None
        result = _run(["-c", CALL_PROBE, lib]) if lib else f"build failed: {built[-300:]}"
        print(f"probe op built with {cxx} ({version[0] if version else '?'}): {result}")
    print("dres_fast_C.spline_mix with bad arguments:", _run(["-c", CALL_DRES]).replace("\n", " | "))


if __name__ == "__main__":
    main()
