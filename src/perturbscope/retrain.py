"""Moved to :mod:`perturbscope.ops.retrain`; this name keeps old imports (and ``python -m``) working."""

import sys

from perturbscope.ops import retrain as _module

if __name__ == "__main__":
    raise SystemExit(_module.main())
sys.modules[__name__] = _module
