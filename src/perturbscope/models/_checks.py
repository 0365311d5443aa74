"""Constructor argument checks shared by the models: a clear ``ValueError`` naming the argument."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["ParameterError", "check_float", "check_int"]


class ParameterError(ValueError):
    """A bad constructor argument; the message starts with the argument's name (``name``)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name} {message}")
        self.name = name


def check_int(name: str, value: Any, minimum: int, hint: str) -> int:
    """``value`` as an int, or :class:`ParameterError` when it is not an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ParameterError(name, f"must be {what}, got {value!r}; {hint}")
    return int(value)


def check_float(name: str, value: Any, low: float, high: float, hint: str) -> float:
    """``value`` as a float, or :class:`ParameterError` when it is not a finite number in ``[low, high)``."""
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    if not ok or not (low <= float(value) < high) or not math.isfinite(float(value)):
        raise ParameterError(name, f"must be a number in [{low}, {high}), got {value!r}; {hint}")
    return float(value)
