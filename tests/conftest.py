import os
import sys

import torch

# The Triton kernels run on CPU tensors through Triton's interpreter in CI. Triton decides at
# decoration time (when dres_fast.kernels is imported) whether a kernel is interpreted, so the variable
# is set here, before any test module imports dres_fast (tests/reference.py decides from it whether
# backend "triton" runs here). Without a CUDA GPU it is set to 1 even when the environment says 0:
# the interpreter is the only way the Triton backend runs on CPU, and 0 would silently turn every
# Triton test into a skip. On a GPU machine the real kernels run instead (unless the caller sets it).
if not torch.cuda.is_available():
    if "dres_fast.kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("tests/conftest.py: dres_fast.kernels was imported before TRITON_INTERPRET=1 was set; "
                           "the Triton kernels would not run on CPU")
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters emptied before and after a test (compile tests count recompiles)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
