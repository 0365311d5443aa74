"""Moved to :mod:`perturbscope.ops.screens`; this name keeps old imports (and ``python -m``) working."""

import sys

from perturbscope.ops import screens as _module

sys.modules[__name__] = _module
