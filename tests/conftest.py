import os

import torch

# The Triton kernels run on CPU tensors through Triton's interpreter in CI; the variable must be set
# before anything imports triton (tests/reference.py decides from it whether backend "triton" runs
# here). On a GPU machine the real kernels run instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
