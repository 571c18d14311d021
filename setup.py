"""Build and install dres_fast.

The top-level ``kernels/`` folder ships as ``dres_fast.kernels`` (never as a top-level ``kernels``).
The CUDA extension ``dres_fast._C`` is built here when a CUDA toolkit and a CUDA-enabled torch are
present at build time (``FORCE_CUDA=1`` forces it, ``DRES_SKIP_CUDA=1`` skips it; build with
``pip install --no-build-isolation`` so the build sees your torch). Otherwise ``backend="cuda"``
compiles it on first use with ninja.
"""

import importlib.util
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _build_support():
    # Loaded by path: importing the dres_fast package here would need torch before it is installed.
    path = os.path.join(HERE, "dres_fast", "_build_support.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location("_dres_build_support", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    support = _build_support()
    if support is None:
        return [], {}
    extensions = support.cuda_extensions()
    return extensions, support.build_cmdclass(extensions)


ext_modules, cmdclass = _extensions()

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as fh:
    long_description = fh.read()

setup(
    name="dres_fast",
    version="0.1.0",
    description="Dual Reconstruction Smoothing (DReS): a fast drop-in smoothness regularizer for PyTorch",
    long_description=long_description,
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["dres_fast", "dres_fast.ops", "dres_fast.backends", "dres_fast.integrations", "dres_fast.kernels",
              "dres_fast.csrc"],
    # kernels/ and csrc/ live at the top of the repository but install inside the package; csrc/
    # ships its sources so backend="cuda" can compile them on first use.
    package_dir={"dres_fast.kernels": "kernels", "dres_fast.csrc": "csrc"},
    # backends/banded_cpu.c: the banded CPU kernel, compiled on first use
    package_data={"dres_fast.csrc": ["*.cu", "*.cuh", "*.h", "*.cpp"], "dres_fast.backends": ["*.c"]},
    include_package_data=False,
    install_requires=["torch>=2.4", "numpy", "scipy"],
    extras_require={
        "triton": ["triton>=3.0"],
        # dres_fast.integrations (hf: transformers.Trainer, which needs accelerate; lightning). Name torch in
        # the same pip command, or pip may replace a CPU torch with the CUDA build.
        "integrations": ["transformers>=4.50", "accelerate>=1.1", "pytorch-lightning>=2.0"],
        # sktime: the UCR time series bundled in its wheel (bench/generalization/timeseries.py); pinned, and
        # installed in the same pip call as torch
        "bench": ["matplotlib", "tqdm", "scikit-learn", "mlxtend", "sktime==1.2.0"],
        "dev": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "mpmath",
            "ninja",
            "pybind11",
            "matplotlib",
            "tqdm",
            "scikit-learn",
            "mlxtend",
            "sktime==1.2.0",
        ],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
