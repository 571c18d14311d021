"""The CUDA adapter checks its arguments in Python before the C++ op sees them (on the first GPU run a failed
TORCH_CHECK inside the extension crashed the process). These checks run anywhere: no extension is loaded."""
import pytest
import torch

from dres_fast.backends import cuda


@pytest.fixture
def no_extension(monkeypatch):
    def fail():
        raise AssertionError("the extension must not be reached with a bad argument")

    monkeypatch.setattr(cuda, "_ops", fail)


class FakeCuda(torch.Tensor):
    """A CPU tensor that reports a CUDA device: enough to reach the checks that follow the device check."""

    @property
    def device(self):
        return torch.device("cuda", 0)


def on_cuda(t):
    return t.as_subclass(FakeCuda)


@pytest.mark.parametrize("call, message", [
    (lambda: cuda.spline_mix(torch.eye(3), torch.randn(3, 4)), "weights must be a CUDA tensor"),
    (lambda: cuda.spline_mix(on_cuda(torch.eye(3)), torch.randn(3, 4)), "x must be a CUDA tensor"),
    (lambda: cuda.spline_mix(on_cuda(torch.eye(3)), on_cuda(torch.randn(3))), "x must be 2-D"),
    (lambda: cuda.spline_mix(on_cuda(torch.ones(3, 4)), on_cuda(torch.randn(5, 4))), "disagree on K"),
    (lambda: cuda.spline_mix(on_cuda(torch.eye(3)), on_cuda(torch.ones(3, 4, dtype=torch.int32))),
     "x must be float32, float64, float16 or bfloat16"),
    (lambda: cuda.spline_mix(on_cuda(torch.eye(3, dtype=torch.int64)), on_cuda(torch.ones(3, 4))),
     "weights must be a floating-point tensor"),
    (lambda: cuda.reconstruction_loss(on_cuda(torch.ones(3, 4)), on_cuda(torch.ones(5, 4, dtype=torch.float64)),
                                      on_cuda(torch.ones(3, 5)), "mean", True), "y_coded must have the dtype of y"),
    (lambda: cuda.reconstruction_loss(on_cuda(torch.ones(3, 4)), on_cuda(torch.ones(5, 6)),
                                      on_cuda(torch.ones(3, 5)), "mean", True), "disagree on d"),
    (lambda: cuda.reconstruction_loss(on_cuda(torch.ones(3, 4)), on_cuda(torch.ones(5, 4)),
                                      on_cuda(torch.ones(5, 3)), "mean", True), r"decoder must be \(K, N\) = \(3, 5\)"),
    (lambda: cuda.reconstruction_loss(on_cuda(torch.ones(3, 4)), on_cuda(torch.ones(5, 4)),
                                      on_cuda(torch.ones(3, 5)), "max", True), 'reduction must be "mean", "sum" or "none"'),
    (lambda: cuda.reconstruction_loss(on_cuda(torch.ones(3, 4)), torch.ones(5, 4), on_cuda(torch.ones(3, 5)),
                                      "mean", True), "y_coded must be a CUDA tensor"),
])
def test_bad_arguments_are_named_before_the_extension(no_extension, call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_host_compiler_prefers_dres_cxx_then_the_system_compiler(monkeypatch, tmp_path):
    """The extension is built with DRES_CXX, else the system g++, else CXX (on the first GPU machine CXX named a
    wrapper compiler in /opt whose builds crashed the process on any C++ error, while /usr/bin/g++'s raised), and
    the first-use build's cache directory names the compiler, so a build made with another one is never reused."""
    import os

    from dres_fast import _build_support as build

    monkeypatch.delenv("DRES_CXX", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(build, "SYSTEM_CXX", str(tmp_path / "g++"))
    assert build.host_compiler() is None
    monkeypatch.setenv("CXX", "/opt/cc/g++")
    assert build.host_compiler() == "/opt/cc/g++"  # no system compiler: CXX
    (tmp_path / "g++").write_text("")
    assert build.host_compiler() == str(tmp_path / "g++")  # the system compiler wins over CXX
    monkeypatch.setenv("DRES_CXX", "/opt/other/g++")
    assert build.host_compiler() == "/opt/other/g++"
    assert "opt_other_g++" in cuda.cache_dir()
    monkeypatch.delenv("CC", raising=False)
    with cuda._compiler_env():  # torch compiles the binding with CXX, nvcc takes its host compiler from CC
        assert os.environ["CXX"] == os.environ["CC"] == "/opt/other/g++"
    assert os.environ["CXX"] == "/opt/cc/g++" and "CC" not in os.environ  # restored after the build
