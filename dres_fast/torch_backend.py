"""Old name of :mod:`dres_fast.backends.reference` (the same module object, kept for existing imports)."""

import sys

from .backends import reference

sys.modules[__name__] = reference
