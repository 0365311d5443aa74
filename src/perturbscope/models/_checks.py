"""Argument checks shared by the models: a :class:`ParameterError` naming the argument and the fix."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["ParameterError", "check_choice", "check_float", "check_int"]


class ParameterError(ValueError):
    """A bad argument of a model, a :class:`~perturbscope.models.TrainConfig` or a model class's ``fit``.

    The message is ``"<name> <detail>"``. ``name`` is the argument as the Python API spells it
    (``n_salient``, ``lr``); ``group`` says where it belongs (``"model"``: a module's
    hyperparameter, ``"training"``: a :class:`~perturbscope.models.TrainConfig` field, None: an
    argument of the call), so a caller that took the value from a configuration file can name its
    own key instead (the Kedro nodes do: ``contrastive_model.model.n_salient``).
    """

    def __init__(self, name: str, detail: str, group: str | None = None) -> None:
        super().__init__(f"{name} {detail}")
        self.name = name
        self.detail = detail
        self.group = group

    def within(self, group: str) -> ParameterError:
        """The same error, marked as belonging to ``group`` (when it names no group yet)."""
        return self if self.group else ParameterError(self.name, self.detail, group)


def check_int(name: str, value: Any, minimum: int, hint: str) -> int:
    """``value`` as an int, or :class:`ParameterError` when it is not an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ParameterError(name, f"must be {what}, got {value!r}; {hint}")
    return int(value)


def check_float(name: str, value: Any, low: float, high: float, hint: str) -> float:
    """``value`` as a float, or :class:`ParameterError` when it is not a finite number in ``[low, high)``."""
    ok = isinstance(value, int | float | np.floating) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)) or not (low <= float(value) < high):
        raise ParameterError(name, f"must be a number in [{low}, {high}), got {value!r}; {hint}")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[Any], hint: str = "") -> Any:
    """``value`` when it is one of ``choices``, else :class:`ParameterError` listing them."""
    if value not in choices:
        raise ParameterError(name, f"must be one of {list(choices)}, got {value!r}{'; ' + hint if hint else ''}")
    return value
