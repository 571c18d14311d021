"""Old name of :mod:`dres_fast.backends.cuda` (the same module object, kept for existing imports)."""

import sys

from .backends import cuda

sys.modules[__name__] = cuda
