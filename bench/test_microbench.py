"""pytest-benchmark microbenchmarks of the two ops, forward + backward, per available backend.

Run: ``pytest bench --benchmark-only`` (add ``--benchmark-json FILE`` to keep the numbers).
On CUDA each timed call ends with a synchronize so the timer sees the kernels, not the launch."""
import pytest
import torch

from bench.kernels import default_weights
from dres_fast import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in ops.available_backends() if DEVICE == "cuda" or b == "torch"]
SHAPES = [(64, 64, 4096), (256, 256, 4096)] if DEVICE == "cpu" else [(256, 256, 2**16), (256, 256, 2**20)]
DTYPES = [torch.float32, torch.bfloat16]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,N,d", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_spline_mix_fwd_bwd(benchmark, backend, K, N, d, dtype):
    weights = default_weights(K, N, DEVICE, dtype)[0]  # the encoder dres_loss uses by default
    x = torch.randn(K, d, device=DEVICE, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(N, d, device=DEVICE, dtype=dtype)

    def step():
        x.grad = None
        ops.spline_mix(weights, x, backend=backend).backward(grad_out)
        _sync()

    benchmark(step)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,N,d", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_reconstruction_loss_fwd_bwd(benchmark, backend, K, N, d, dtype):
    decoder = default_weights(K, N, DEVICE, dtype)[1]
    y_coded = torch.randn(N, d, device=DEVICE, dtype=dtype, requires_grad=True)
    y = (decoder @ y_coded.detach().float()).to(dtype).requires_grad_(True)

    def step():
        y.grad = y_coded.grad = None
        ops.reconstruction_loss(y, y_coded, decoder, backend=backend).backward()
        _sync()

    benchmark(step)
