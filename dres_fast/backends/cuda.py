"""Backend "cuda": finds or builds the CUDA extension (sources in ``csrc/``) and adapts its ops.

The kernels live in csrc/ (plain CUDA launchers + a torch binding that defines the ops
``torch.ops.dres_fast_C.spline_mix`` and ``torch.ops.dres_fast_C.reconstruction_loss`` with CUDA and
Meta kernels; the Meta kernels are their fake kernels). ``load()`` makes them available, in this
order, and returns this module (:mod:`dres_fast.ops` registers the ops' autograd, named by ``OPS``):

1. ``import dres_fast._C``: the extension built at install time by setup.py;
2. a first-use build with ``torch.utils.cpp_extension.load`` (nvcc + ninja) into
   ``$DRES_FAST_CACHE/<torch version>-cu<CUDA version>/cuda_ext`` (default cache root
   ``~/.cache/dres_fast``), reused by later processes (torch rebuilds only when the sources change).

``is_available()`` and ``is_built()`` never compile anything. ``spline_mix(weights, x)`` and
``reconstruction_loss(y, y_coded, decoder, reduction, compute_grads)`` call the C++ ops directly
(no autograd needed), as docs/ARCHITECTURE.md specifies; ``banded_apply(arrays, x, transpose)`` (not in ``OPS``)
applies a BandedSpline's coefficients (``torch.ops.dres_fast_C.banded_apply``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import shutil
import sys
import threading
import traceback

from .._build_support import host_compiler, kernel_sources
from ..contract import FLOAT_DTYPES, REDUCTIONS
from . import BackendUnavailableError

NAME = "cuda"
JIT_NAME = "dres_fast_C_jit"
PREBUILT_NAME = "dres_fast._C"
OPS_NAMESPACE = "dres_fast_C"
#: the ops the extension defines (schema and Meta kernels in csrc/binding.cpp)
OPS = (f"{OPS_NAMESPACE}::spline_mix", f"{OPS_NAMESPACE}::reconstruction_loss")

_LOCK = threading.RLock()
_loaded_from: str | None = None  # "dres_fast._C" or the first-use build's directory


def _package_dir() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_dir() -> str | None:
    """The csrc/ directory with the kernel sources (shipped inside the package or beside it)."""
    for candidate in (
        os.path.join(_package_dir(), "csrc"),
        os.path.join(os.path.dirname(_package_dir()), "csrc"),
    ):
        if os.path.isfile(os.path.join(candidate, "binding.cpp")):
            return candidate
    return None


def source_files() -> list[str]:
    src = source_dir()
    return [] if src is None else kernel_sources(src)


def cache_dir() -> str:
    """Build directory of the first-use build; one per torch version, CUDA version and host compiler
    (a build made with another compiler is never reused: see ``_build_support.host_compiler``)."""
    import torch

    root = os.environ.get("DRES_FAST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "dres_fast"
    )
    compiler = host_compiler() or "c++"
    tag = f"{torch.__version__}-cu{torch.version.cuda or 'none'}-{compiler.strip(os.sep)}"
    return os.path.join(root, tag.replace(os.sep, "_"), "cuda_ext")


def _jit_library_path() -> str:
    return os.path.join(cache_dir(), JIT_NAME + ".so")


def _runtime_missing() -> str | None:
    """Why the kernels cannot run in this process at all (None when they can)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if torch.version.cuda is None:
        return (
            f"the installed PyTorch ({torch.__version__}) is a CPU-only build without CUDA "
            "support; install a CUDA-enabled torch, e.g. "
            "`pip install torch --index-url https://download.pytorch.org/whl/cu126`"
        )
    if not torch.cuda.is_available():
        return (
            "no CUDA GPU is visible (torch.cuda.is_available() is False): check the NVIDIA "
            "driver and CUDA_VISIBLE_DEVICES"
        )
    return None


def _toolchain_missing() -> str | None:
    """Why a first-use build cannot be attempted (None when it can)."""
    if not source_files():
        return (
            "the CUDA sources (csrc/*.cu, csrc/binding.cpp) are not shipped with this install; "
            "reinstall dres_fast from source with a CUDA toolkit so that dres_fast._C is built"
        )
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

    if CUDA_HOME is None or not (
        shutil.which("nvcc") or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    ):
        return (
            "no CUDA toolkit found (nvcc is not on PATH and CUDA_HOME is unset) to compile the "
            "extension on first use; install the CUDA toolkit matching torch.version.cuda or "
            "set CUDA_HOME"
        )
    if not is_ninja_available():
        return "ninja is not installed (needed for the first-use build): `pip install ninja`"
    return None


def _prebuilt_present() -> bool:
    try:
        return importlib.util.find_spec(PREBUILT_NAME) is not None
    except (ImportError, ValueError):
        return False


def _ops_registered() -> bool:
    import torch

    try:
        getattr(torch.ops, OPS_NAMESPACE).spline_mix
        getattr(torch.ops, OPS_NAMESPACE).reconstruction_loss
    except (AttributeError, RuntimeError):
        return False
    return True


def is_built() -> bool:
    """True when the extension is loaded, installed (dres_fast._C) or in the first-use cache."""
    if _loaded_from is not None:
        return True
    if _prebuilt_present():
        return True
    try:
        return os.path.exists(_jit_library_path())
    except ImportError:
        return False


def is_available(device_type: str = "cuda") -> tuple[bool, str]:
    """(usable, reason) without building anything. Usable means load() is expected to succeed:
    CUDA tensors, a CUDA torch, a visible GPU, and either a built extension or the tools to build it."""
    if device_type != "cuda":
        return False, f"backend 'cuda' needs CUDA tensors; these are on '{device_type}'"
    missing = _runtime_missing()
    if missing is not None:
        return False, missing
    if _loaded_from is not None:
        return True, f"loaded from {_loaded_from}"
    if _prebuilt_present():
        return True, f"prebuilt extension {PREBUILT_NAME} is installed"
    if os.path.exists(_jit_library_path()):
        return True, f"first-use build cached at {cache_dir()}"
    missing = _toolchain_missing()
    if missing is not None:
        return False, missing
    return True, f"not built yet: compiled with nvcc on first use into {cache_dir()}"


def _unavailable(reason: str) -> BackendUnavailableError:
    return BackendUnavailableError(f"backend 'cuda' is not available: dres_fast CUDA extension: {reason}")


def load(verbose: bool = False):
    """Load (building on first use if needed) the CUDA extension; returns this module, whose
    ``spline_mix`` and ``reconstruction_loss`` call its ops. Thread-safe; later calls are free. Raises
    BackendUnavailableError (a RuntimeError) naming what is missing or where the build log is."""
    _load_extension(verbose)
    return sys.modules[__name__]


def _load_extension(verbose: bool) -> None:
    global _loaded_from
    with _LOCK:
        if _loaded_from is not None:
            return
        missing = _runtime_missing()
        if missing is not None:
            raise _unavailable(missing)

        prebuilt_error = None
        if _prebuilt_present():
            try:
                importlib.import_module(PREBUILT_NAME)
            except (ImportError, OSError) as exc:  # e.g. built against another torch
                prebuilt_error = f"{PREBUILT_NAME} is installed but failed to import: {exc}"
            else:
                if _ops_registered():
                    _loaded_from = PREBUILT_NAME
                    if verbose:
                        print(f"dres_fast: CUDA backend loaded from {PREBUILT_NAME}")
                    return
                prebuilt_error = f"{PREBUILT_NAME} imported but did not register the ops"

        missing = _toolchain_missing()
        if missing is not None:
            if prebuilt_error:
                missing = f"{prebuilt_error}; and {missing}"
            raise _unavailable(missing)

        build_dir = cache_dir()
        os.makedirs(build_dir, exist_ok=True)
        log_path = os.path.join(build_dir, "build_error.log")
        try:
            from torch.utils.cpp_extension import load as jit_load

            with _compiler_env():
                jit_load(
                    name=JIT_NAME,
                    sources=source_files(),
                    extra_include_paths=[source_dir()],
                    # IEEE arithmetic: no --use_fast_math (the loss is sensitive to rounding).
                    extra_cflags=["-O3"],
                    extra_cuda_cflags=["-O3", "-lineinfo"],
                    build_directory=build_dir,
                    is_python_module=False,
                    verbose=verbose,
                )
        except Exception as exc:  # compiler errors arrive as RuntimeError/CalledProcessError
            with open(log_path, "w") as log:
                log.write(f"{exc}\n\n{traceback.format_exc()}")
            raise _unavailable(
                f"building the CUDA extension failed ({type(exc).__name__}); the compiler "
                f"output is in {log_path} (build directory {build_dir})"
            ) from exc
        if not _ops_registered():
            raise _unavailable(f"the build in {build_dir} loaded but did not register the ops")
        if os.path.exists(log_path):
            os.remove(log_path)
        _loaded_from = build_dir
        if verbose:
            print(f"dres_fast: CUDA backend built/loaded from {build_dir}")


@contextlib.contextmanager
def _compiler_env():
    """``CXX`` and ``CC`` set to the chosen host compiler for the duration of the build only: torch builds the
    .cpp files with ``CXX``, and nvcc takes its host compiler (``-ccbin``) from ``CC``."""
    compiler = host_compiler()
    previous = {name: os.environ.get(name) for name in ("CXX", "CC")}
    if compiler:
        os.environ["CXX"] = os.environ["CC"] = compiler
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _ops():
    if _loaded_from is None:
        _load_extension(verbose=False)
    import torch

    return getattr(torch.ops, OPS_NAMESPACE)


_WHO = "dres_fast cuda backend: "


def _check_2d_cuda(tensor, name: str) -> None:
    # For direct calls of this adapter (tests, benchmarks; dres_fast.ops validates before it dispatches):
    # the binding checks the same (csrc/binding.cpp), but an extension built with a host compiler whose C++
    # runtime differs from the process's crashes on a failed TORCH_CHECK instead of raising
    # (bench/cpp_throw_probe.py tells per machine), so a bad argument must not reach C++.
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{_WHO}{name} must be a tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cuda":
        raise RuntimeError(f"{_WHO}{name} must be a CUDA tensor, got device {tensor.device}")
    if tensor.dim() != 2:
        raise RuntimeError(f"{_WHO}{name} must be 2-D, got shape {list(tensor.shape)}")


def _check_same_device(a, a_name: str, b, b_name: str) -> None:
    if a.device != b.device:
        raise RuntimeError(f"{_WHO}{a_name} and {b_name} must be on the same device, got {a.device} and {b.device}")


def _check_data_dtype(tensor, name: str) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise RuntimeError(f"{_WHO}{name} must be float32, float64, float16 or bfloat16, got {tensor.dtype}")


def _check_spline_mix(weights, x) -> None:
    _check_2d_cuda(weights, "weights")
    _check_2d_cuda(x, "x")
    _check_same_device(weights, "weights", x, "x")
    _check_data_dtype(x, "x")
    if not weights.is_floating_point():
        raise RuntimeError(f"{_WHO}weights must be a floating-point tensor, got {weights.dtype}")
    if weights.shape[1] != x.shape[0]:
        raise RuntimeError(f"{_WHO}weights (M, K) and x (K, d) disagree on K: weights {list(weights.shape)}, "
                           f"x {list(x.shape)}")


def _check_reconstruction(y, y_coded, decoder, reduction) -> None:
    for tensor, name in ((y, "y"), (y_coded, "y_coded"), (decoder, "decoder")):
        _check_2d_cuda(tensor, name)
    _check_same_device(y, "y", y_coded, "y_coded")
    _check_same_device(y, "y", decoder, "decoder")
    _check_data_dtype(y, "y")
    if y_coded.dtype != y.dtype:
        raise RuntimeError(f"{_WHO}y_coded must have the dtype of y ({y.dtype}), got {y_coded.dtype}")
    if y_coded.shape[1] != y.shape[1]:
        raise RuntimeError(f"{_WHO}y (K, d) and y_coded (N, d) disagree on d: y {list(y.shape)}, "
                           f"y_coded {list(y_coded.shape)}")
    if tuple(decoder.shape) != (y.shape[0], y_coded.shape[0]):
        raise RuntimeError(f"{_WHO}decoder must be (K, N) = ({y.shape[0]}, {y_coded.shape[0]}), got "
                           f"{list(decoder.shape)}")
    if not decoder.is_floating_point():
        raise RuntimeError(f"{_WHO}decoder must be a floating-point tensor, got {decoder.dtype}")
    if reduction not in REDUCTIONS:
        raise RuntimeError(f'{_WHO}reduction must be "mean", "sum" or "none", got "{reduction}"')


def spline_mix(weights, x):
    """out = weights @ x over the batch axis: weights (M, K) in the compute dtype, x (K, d) of
    float32/float64/float16/bfloat16 with any strides; returns (M, d), contiguous, x's dtype.
    Accumulates in float32 (float64 for float64) with IEEE products, never TF32."""
    _check_spline_mix(weights, x)
    return _ops().spline_mix(weights, x)


def reconstruction_loss(y, y_coded, decoder, reduction, compute_grads):
    """r = y - decoder @ y_coded; per_sample = sum_j r^2; returns (loss, grad_y, grad_y_coded)
    with the reductions, dtypes and gradient conventions of docs/ARCHITECTURE.md. Reductions are
    deterministic (fixed-order per-block partial sums)."""
    _check_reconstruction(y, y_coded, decoder, reduction)
    loss, grad_y, grad_y_coded = _ops().reconstruction_loss(
        y, y_coded, decoder, reduction, bool(compute_grads)
    )
    return loss, grad_y, grad_y_coded



def banded_apply(arrays, x, transpose=False, refinement=None):
    """W @ x (``transpose``: W^T @ x) for a BandedSpline (dres_fast/banded.py, finite lam) given as ``arrays``,
    its (factor, stencil, index, chord, curvature, gather) on x's device; x (n, d) ((p, d) transposed) of
    float32/float64/float16/bfloat16, any strides; returns a contiguous tensor in x's dtype. float64 throughout
    (csrc/banded.cu); ``refinement`` = the spline's (q_bands, r_bands, lam) where it has ``refine``: its step of
    iterative refinement. A plain function, not in ``OPS``: the op has no autograd here."""
    import torch

    _check_2d_cuda(x, "x")
    _check_data_dtype(x, "x")
    factor, index = arrays[0], arrays[2]
    m = factor.shape[-1] if isinstance(factor, torch.Tensor) and factor.dim() == 2 else 0
    p = index.shape[0] if isinstance(index, torch.Tensor) and index.dim() == 1 else -1
    f64, i64 = torch.float64, torch.int64
    expected = (("factor", f64, (3, m)), ("stencil", f64, (3, m)), ("index", i64, (p,)), ("chord", f64, (p, 2)),
                ("curvature", f64, (p, 4)), ("gather", i64, (p, 4)), ("q_bands", f64, (3, m)), ("r_bands", f64, (2, m)))
    bands = () if refinement is None else tuple(refinement[:2])
    for tensor, (name, dtype, shape) in zip(tuple(arrays) + bands, expected[:6 + len(bands)], strict=True):
        if not (isinstance(tensor, torch.Tensor) and tensor.device == x.device and tensor.dtype == dtype
                and tuple(tensor.shape) == shape and m >= 1):
            raise RuntimeError(f"{_WHO}{name} must be a {dtype} tensor of shape {shape} on {x.device} (m = n - 2 "
                               f"from factor, p from index), got {getattr(tensor, 'shape', type(tensor).__name__)}")
    if x.shape[0] != (p if transpose else m + 2):
        raise RuntimeError(f"{_WHO}x {list(x.shape)} does not fit the map (n = {m + 2}, p = {p}, "
                           f"transpose = {transpose})")
    if refinement is None:
        return _ops().banded_apply(*arrays, x, bool(transpose))
    return _ops().banded_apply(*arrays, x, bool(transpose), *bands, float(refinement[2]))
