"""Install-time build of the CUDA backend (the extension ``dres_fast._C``), used by setup.py.

Nothing heavy is imported at module import: torch is imported only inside the functions, so
setup.py can import this file (by path) before deciding anything, and every function works with a
CPU-only torch or with no torch at all.

Environment variables (as torchvision's ``FORCE_CUDA``):
  DRES_SKIP_CUDA=1  never build the extension (wins over FORCE_CUDA);
  FORCE_CUDA=1      build it even when the CUDA toolkit or a CUDA-enabled torch is not detected
                    (e.g. a build container without a GPU); the build then fails loudly if the
                    toolkit really is missing.
  DRES_CXX=path     the host C++ compiler for the binding (default: the system g++, then CXX; see
                    ``host_compiler``).
Otherwise the extension is built when torch is a CUDA build and torch finds a CUDA toolkit (nvcc).
A GPU is not needed at build time; without TORCH_CUDA_ARCH_LIST and without a visible GPU the
extension is built for sm_80 and sm_90 (torch's own list can name architectures that a newer nvcc
no longer accepts).
"""

from __future__ import annotations

import glob
import os

EXTENSION_NAME = "dres_fast._C"
DEFAULT_ARCH_LIST = "8.0;9.0"
_TRUE = {"1", "true", "yes", "on"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def repo_root() -> str:
    """The directory holding setup.py, csrc/ and dres_fast/."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kernel_sources(directory: str) -> list[str]:
    """The CUDA (.cu) and binding (.cpp) sources in ``directory``, each group sorted."""
    found = sorted(glob.glob(os.path.join(directory, "*.cu")))
    return found + sorted(glob.glob(os.path.join(directory, "*.cpp")))


def csrc_sources(relative: bool = True) -> list[str]:
    """kernel_sources of the repository's csrc/; relative to repo_root() by default (setuptools
    wants paths relative to setup.py)."""
    root = repo_root()
    found = kernel_sources(os.path.join(root, "csrc"))
    return [os.path.relpath(p, root) if relative else p for p in found]


# The system compiler builds against the C++ runtime that the Python process loads at run time. A `c++`
# wrapper in another prefix can link a different runtime: a torch op built with it may crash (SIGSEGV)
# whenever it raises a C++ error (TORCH_CHECK), while the same op built with /usr/bin/g++ raises a
# RuntimeError as it should (bench/cpp_throw_probe.py tells per machine; bench/RESULTS.md has a case).
SYSTEM_CXX = "/usr/bin/g++"


def host_compiler() -> str | None:
    """The C++ compiler for the extension: ``DRES_CXX`` when set, else the system g++ when there is one
    (even when ``CXX`` names another: ``CXX`` itself may name such a wrapper), else
    ``CXX``, else ``None`` (torch's default, ``c++`` on PATH)."""
    if os.environ.get("DRES_CXX"):
        return os.environ["DRES_CXX"]
    if os.path.exists(SYSTEM_CXX):
        return SYSTEM_CXX
    return os.environ.get("CXX") or None


def use_host_compiler() -> str | None:
    """Set ``CXX`` (read by torch's extension builders) to :func:`host_compiler`; returns it."""
    compiler = host_compiler()
    if compiler:
        os.environ["CXX"] = compiler
    return compiler


def cuda_build_decision() -> tuple[bool, str]:
    """(build the extension?, why) from the environment, torch and the CUDA toolkit."""
    if _flag("DRES_SKIP_CUDA"):
        return False, "DRES_SKIP_CUDA is set"
    if _flag("FORCE_CUDA"):
        return True, "FORCE_CUDA is set"
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:  # pragma: no cover - every torch with CUDA has it
        return False, "torch.utils.cpp_extension is missing"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (nvcc not on PATH and CUDA_HOME unset)"
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), toolkit at {CUDA_HOME}"


def cuda_extensions() -> list:
    """[CUDAExtension("dres_fast._C", ...)] when the CUDA backend should be built, else []."""
    build, _why = cuda_build_decision()
    if not build:
        return []
    import torch
    from torch.utils.cpp_extension import CUDAExtension

    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    use_host_compiler()
    try:
        extension = CUDAExtension(
            name=EXTENSION_NAME,
            sources=csrc_sources(relative=True),
            include_dirs=[os.path.join(repo_root(), "csrc")],
            # IEEE arithmetic: no --use_fast_math (the loss is sensitive to rounding in D @ y_coded).
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
        )
    except OSError as exc:  # FORCE_CUDA without a toolkit torch can find (CUDA_HOME)
        raise RuntimeError(
            f"FORCE_CUDA is set but the CUDA extension cannot be configured: {exc} "
            "Install a CUDA-enabled torch and the CUDA toolkit (or set CUDA_HOME), or unset "
            "FORCE_CUDA (DRES_SKIP_CUDA=1 skips the extension)."
        ) from exc
    return [extension]


def build_cmdclass(extensions: list | None = None) -> dict:
    """setup(cmdclass=...) for the given extensions: torch's BuildExtension when there are any
    (it compiles .cu files with nvcc and adds torch's flags), else {} (no torch import)."""
    if extensions is None:
        extensions = cuda_extensions()
    if not extensions:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension}
