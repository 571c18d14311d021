"""``import dres_fast`` stays cheap: Triton, Dynamo, scipy and the spline code load on first use.

Checked by what an import leaves in ``sys.modules`` (in a fresh interpreter), not by timing it.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # every test starts a fresh interpreter importing torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("triton", "scipy", "torch._dynamo", "dres_fast.splines", "dres_fast.kernels", "dres_fast.backends.cuda")


def _run(code: str, **env) -> str:
    environment = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    environment.pop("TRITON_INTERPRET", None)
    environment.update(env)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env=environment, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_import_loads_nothing_heavy():
    out = _run(f"""
        import sys
        import torch
        import dres_fast
        print([name for name in {HEAVY!r} if name in sys.modules])
    """)
    assert out.strip() == "[]", f"import dres_fast loaded {out.strip()}"


def test_spline_functions_load_on_first_use():
    out = _run("""
        import sys
        import dres_fast
        assert "dres_fast.splines" not in sys.modules
        print(round(float(dres_fast.points(3)[0]), 12), "points" in dir(dres_fast), "dres_fast.splines" in sys.modules)
    """)
    assert out.split() == [repr(round(-(3 ** 0.5) / 2, 12)), "True", "True"]


@pytest.mark.skipif(not any(os.path.isdir(os.path.join(p, "triton")) for p in sys.path if p),
                    reason="triton is not installed")
def test_triton_interpret_set_after_import_works():
    out = _run("""
        import os
        import torch
        import dres_fast
        os.environ["TRITON_INTERPRET"] = "1"   # after import dres_fast, before the first use
        weights, x = torch.randn(5, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
        out = dres_fast.ops.spline_mix(weights, x, backend="triton")
        torch.testing.assert_close(out, weights @ x)
        print("ok")
    """)
    assert out.strip() == "ok"


@pytest.mark.skipif(not any(os.path.isdir(os.path.join(p, "triton")) for p in sys.path if p),
                    reason="triton is not installed")
def test_triton_interpret_set_too_late_says_so():
    out = _run("""
        import os
        import torch
        import triton  # imported before the variable is set: the interpreter stays off
        import dres_fast
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            dres_fast.ops.spline_mix(torch.randn(5, 4), torch.randn(4, 3), backend="triton")
        except dres_fast.ops.BackendUnavailableError as err:
            print(err)
        print(dres_fast.ops.available_backends("cpu"))
    """)
    assert "TRITON_INTERPRET=1 is set but triton was imported before it was set" in out
    assert out.strip().endswith("['torch']")
