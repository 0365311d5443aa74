"""Moved to :mod:`perturbscope.ops.registry`; this name keeps old imports (and ``python -m``) working."""

import sys

from perturbscope.ops import registry as _module

sys.modules[__name__] = _module
