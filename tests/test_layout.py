"""The shape of the package: one module per backend, the op rules in one place, the smoothing spec.

* every backend module has NAME, is_available and load, and dispatch finds it by name;
* the autograd of ``registry.differentiable`` on ops defined outside Python's ``custom_op`` (as the CUDA
  backend's C++ ops are) gives the torch backend's gradients, second derivatives included;
* the package's imports flow one way: no cycle, no backend importing the ops layer or another backend;
* ``SmoothingSpec`` is frozen, validated, hashable, round-trips through its key, and keys the cache.
"""

import ast
import dataclasses
import importlib
import math
import os
from types import SimpleNamespace

import pytest
import torch

import dres_fast
from dres_fast import contract
from dres_fast.backends import reference
from dres_fast.cache import WeightCache
from dres_fast.ops import dispatch, registry
from dres_fast.smoothing import SmoothingSpec, from_key


@pytest.mark.parametrize("name", dispatch.BACKENDS)
def test_every_backend_module_has_the_same_shape(name):
    module = importlib.import_module(dispatch.BACKEND_MODULES[name])
    assert module.NAME == name
    ok, reason = module.is_available("cpu")
    assert isinstance(ok, bool) and isinstance(reason, str)
    assert ok or reason, "an unavailable backend must say why"
    assert callable(module.load)


PACKAGE = os.path.dirname(os.path.abspath(dres_fast.__file__))


def _imports_of_package():
    """module name -> the package modules it imports (at top level or inside functions), read from the source."""
    graph = {}
    for root, _, files in os.walk(PACKAGE):
        for file in files:
            if not file.endswith(".py"):
                continue
            path = os.path.join(root, file)
            parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            package = name if is_package else name.rsplit(".", 1)[0]
            targets = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom):
                    base = package
                    for _ in range(node.level - 1):
                        base = base.rsplit(".", 1)[0]
                    module = (base + ("." + node.module if node.module else "")) if node.level else (node.module or "")
                    targets.add(module)
                    # "from . import ops" imports the module dres_fast.ops; "from .x import f" names a function
                    targets.update(module + "." + alias.name for alias in node.names)
                elif isinstance(node, ast.Import):
                    targets.update(alias.name for alias in node.names)
            graph[name] = {t for t in targets if t.startswith("dres_fast") and t != name}
    modules = set(graph)
    # a module's own packages are being imported already when it runs (``from . import x`` names one)
    return {m: {t for t in ts & modules if not m.startswith(t + ".") and t != m} for m, ts in graph.items()}


def _cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_imports_flow_one_way():
    """No import cycle in the package (lazy imports inside functions count), and a backend imports neither
    the ops layer (which sits above it) nor another backend; the ops layer never imports the DReS step."""
    graph = _imports_of_package()
    assert "dres_fast.ops.registry" in graph and "dres_fast.backends.reference" in graph
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"
    backends = {m for m in graph if m.startswith("dres_fast.backends.")}
    for backend in backends:
        upward = {t for t in graph[backend] if t.startswith("dres_fast.ops") or t in backends
                  or t in ("dres_fast.step", "dres_fast.functional", "dres_fast.module")}
        assert not upward, f"{backend} imports {sorted(upward)}"
    for module in (m for m in graph if m.startswith("dres_fast.ops")):
        assert not graph[module] & {"dres_fast.step", "dres_fast.functional", "dres_fast.module"}, module


def test_the_import_checker_sees_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("dtype", contract.FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", contract.REDUCTIONS)
def test_reference_backend_follows_the_contract(dtype, reduction):
    y, y_coded = torch.randn(5, 3).to(dtype), torch.randn(4, 3).to(dtype)
    decoder = torch.randn(5, 4, dtype=contract.compute_dtype(dtype))
    loss, grad_y, _ = reference.reconstruction_loss(y, y_coded, decoder, reduction, True)
    assert loss.dtype == contract.loss_dtype(dtype)
    residual = y.to(decoder.dtype) - decoder @ y_coded.to(decoder.dtype)
    scale = contract.gradient_scale(reduction, residual.numel())
    assert scale == (2.0 / 15 if reduction == "mean" else 2.0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad_y.to(decoder.dtype), scale * residual, rtol=tol, atol=tol)


_LIB = torch.library.Library("dres_test_cxx", "DEF")  # stands in for csrc/binding.cpp's TORCH_LIBRARY
_LIB.define("spline_mix(Tensor weights, Tensor x) -> Tensor")
_LIB.define("reconstruction_loss(Tensor y, Tensor y_coded, Tensor decoder, str reduction, bool compute_grads) "
            "-> (Tensor, Tensor, Tensor)")
_LIB.impl("spline_mix", reference.spline_mix, "CPU")
_LIB.impl("reconstruction_loss", reference.reconstruction_loss, "CPU")
_LIB.impl("spline_mix", registry._spline_mix_fake, "Meta")
_LIB.impl("reconstruction_loss", registry._reconstruction_loss_fake, "Meta")
CXX_STYLE_OPS = registry.differentiable("test_cxx", SimpleNamespace(
    OPS=("dres_test_cxx::spline_mix", "dres_test_cxx::reconstruction_loss"),
    spline_mix=reference.spline_mix, reconstruction_loss=reference.reconstruction_loss))


@pytest.mark.parametrize("reduction", contract.REDUCTIONS)
def test_autograd_registered_on_ops_defined_elsewhere(reduction):
    # the CUDA backend's path: ops defined (with Meta kernels) outside torch.library.custom_op
    torch.manual_seed(0)
    y = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y_coded = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    decoder = torch.randn(6, 5, dtype=torch.float64)
    incoming = torch.rand(6, dtype=torch.float64) + 0.5 if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)

    loss = CXX_STYLE_OPS.reconstruction_loss(y, y_coded, decoder, reduction)
    grads = torch.autograd.grad(loss, (y, y_coded), incoming)
    per_sample = (y - decoder @ y_coded).square().sum(1)
    expected = {"none": per_sample, "sum": per_sample.sum(), "mean": per_sample.sum() / y.numel()}[reduction]
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grads, torch.autograd.grad(expected, (y, y_coded), incoming))

    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: CXX_STYLE_OPS.spline_mix(decoder, t), (x,))
    torch.autograd.gradgradcheck(lambda a, b: CXX_STYLE_OPS.reconstruction_loss(a, b, decoder, reduction), (y, y_coded))


def test_spec_is_validated_frozen_and_hashable():
    spec = SmoothingSpec(num_coded=12, lam_enc=math.inf, dof_dec=5, alpha=torch.linspace(-1, 1, 8, dtype=torch.float64))
    assert spec.alpha == tuple(torch.linspace(-1, 1, 8, dtype=torch.float64).tolist())
    assert spec.dof_dec == 5.0 and isinstance(spec.dof_dec, float)
    same = SmoothingSpec(12, math.inf, None, None, 5.0, tuple(spec.alpha), "lobatto")
    assert spec == same and hash(spec) == hash(same) and spec.key == same.key
    assert from_key(spec.key) == spec
    assert from_key(SmoothingSpec().key) == SmoothingSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.lam_enc = 1.0
    with pytest.raises(ValueError, match="give lam_dec or dof_dec, not both"):
        SmoothingSpec(lam_dec=1.0, dof_dec=3.0)
    with pytest.raises(TypeError, match="lam_enc must be a real number"):
        SmoothingSpec(lam_enc="0.1")
    with pytest.raises(ValueError, match="beta must be strictly ascending"):
        SmoothingSpec(beta=[0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="alpha must have 6 points"):
        spec.sizes(6)
    assert SmoothingSpec().sizes(7) == (7, 7) and SmoothingSpec(num_coded=4).sizes(7) == (7, 4)


def test_spec_keys_the_cache():
    cache = WeightCache()
    first = cache.weights(SmoothingSpec(lam_enc=0.0, dof_dec=4.0), 6)
    assert cache.weights(SmoothingSpec(lam_enc=0, dof_dec=4), 6)[0] is first[0]  # equal values: a hit
    assert torch.equal(cache.get(6, None, lam_enc=0.0, dof_dec=4.0)[1], first[1])  # get() copies the hit
    assert cache.weights(SmoothingSpec(lam_enc=0.0, dof_dec=4.5), 6)[0] is not first[0]
    assert len(cache) == 2


def test_modules_share_the_functional_spec():
    loss_module = dres_fast.DReSLoss(num_coded=5, dof_enc=3.0, alpha="uniform")
    assert loss_module.spec == SmoothingSpec(num_coded=5, dof_enc=3.0, alpha="uniform")
    reg = dres_fast.SubmoduleDReS(torch.nn.Sequential(torch.nn.Linear(2, 2)), "0", lam_dec=0.1)
    assert reg.spec == SmoothingSpec(lam_dec=0.1)
    with pytest.raises(ValueError, match="give lam_enc or dof_enc, not both"):
        dres_fast.DReSLoss(lam_enc=0.1, dof_enc=3.0)


def test_auto_on_cuda_follows_the_measured_order(monkeypatch):
    """"auto" on CUDA tensors: float16/bfloat16 go to Triton (then the built CUDA extension), float32/float64
    stay on the reference backend (the H200 measurements in bench/RESULTS.md); DRES_BACKEND still overrides."""
    from dres_fast.ops import dispatch

    monkeypatch.delenv("DRES_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_auto_candidate", lambda name: True)
    dispatch._resolve.cache_clear()
    try:
        cuda = torch.device("cuda")
        assert dispatch.resolve_backend("auto", cuda, torch.bfloat16) == "triton"
        assert dispatch.resolve_backend("auto", cuda, torch.float16) == "triton"
        assert dispatch.resolve_backend("auto", cuda, torch.float32) == "torch"
        assert dispatch.resolve_backend("auto", cuda, torch.float64) == "torch"
        monkeypatch.setattr(dispatch, "_auto_candidate", lambda name: name == "cuda")
        dispatch._resolve.cache_clear()
        assert dispatch.resolve_backend("auto", cuda, torch.bfloat16) == "cuda"
        assert dispatch.resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "torch"
        monkeypatch.setenv("DRES_BACKEND", "triton")
        assert dispatch.resolve_backend("auto", cuda, torch.float32) == "triton"
    finally:
        dispatch._resolve.cache_clear()


def test_no_source_file_over_400_lines():
    """A file a reader can hold in mind: no non-test source file of the repository over 400 lines."""
    import subprocess

    root = os.path.dirname(PACKAGE)
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    sources = [f for f in files if f.endswith((".py", ".cu", ".cuh", ".cpp", ".h", ".sh")) and not f.startswith("tests/")]
    long = {f: n for f in sources if os.path.exists(os.path.join(root, f))
            for n in [sum(1 for _ in open(os.path.join(root, f)))] if n > 400}
    assert not long, f"over 400 lines: {long}"


def test_kernels_folder_is_not_importable_as_a_bare_name(tmp_path):
    """From the clone's root the folder kernels/ is on sys.path; ``import kernels`` must find the package
    that owns that name (Hugging Face's, which transformers imports) or nothing, never our folder."""
    import subprocess
    import sys

    root = os.path.dirname(PACKAGE)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    plain = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"], cwd=root, env=env,
                           capture_output=True, text=True)
    if plain.returncode == 0:  # the owner is installed here: that is what must load
        assert not os.path.abspath(plain.stdout.strip()).startswith(os.path.join(root, "kernels")), plain.stdout
    else:
        assert "No module named 'kernels'" in plain.stderr, plain.stderr
    owner = tmp_path / "kernels"
    owner.mkdir()
    (owner / "__init__.py").write_text("OWNER = 'other package'\n")
    env["PYTHONPATH"] = str(tmp_path)  # after the clone's root ('' comes first for python -c)
    found = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.OWNER)"], cwd=root, env=env,
                           capture_output=True, text=True)
    assert found.stdout.strip() == "other package", found.stderr
