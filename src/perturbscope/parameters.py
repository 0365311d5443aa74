"""Parameters at the node boundary: one translation between the conf files and the models' own names.

The models speak Python (``n_salient``, ``lr``); a user of ``kedro run`` edits conf keys
(``contrastive_model.model.n_salient``, ``training.lr``). Nodes use these helpers so that

* every parameter block is the keyword arguments of one function, and that function's signature owns
  each default (:func:`options`): a key it does not take is an error naming ``<section>.<key>`` and the
  keys it takes; a key left out takes the signature's default;
* a model's :class:`~perturbscope.models.ParameterError` or :class:`~perturbscope.models.TrainingError`
  comes out naming the conf key the user set (:func:`conf_errors`): ``contrastive_model.training.lr``
  when the model's own block sets it, ``training.lr`` when only the shared block does.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from perturbscope.models import ParameterError, TrainingError

__all__ = ["ConfigError", "conf_errors", "options", "required", "training_settings"]


class ConfigError(ValueError):
    """A parameter of the conf files does not fit; the message names its key (``section.key``)."""


def _keywords(fn: Callable[..., Any]) -> tuple[set[str], set[str]]:
    """``(every keyword argument, the ones without a default)`` of ``fn``."""
    names, required_ = set(), set()
    for name, parameter in inspect.signature(fn).parameters.items():
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
            names.add(name)
            if parameter.default is parameter.empty:
                required_.add(name)
    return names, required_


def options(
    fn: Callable[..., Any],
    params: Mapping[str, Any] | None,
    section: str,
    *,
    exclude: Iterable[str] = (),
    defaults: bool = False,
) -> dict[str, Any]:
    """``params`` as keyword arguments of ``fn``, checked: an unknown key raises :class:`ConfigError` naming
    ``section.key`` and the keys ``fn`` takes (``exclude``: arguments the node sets itself). With
    ``defaults``, the keys left out are filled with ``fn``'s defaults (its signature owns them)."""
    params = dict(params or {})
    names, _ = _keywords(fn)
    allowed = names - set(exclude)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ConfigError(
            f"Unknown parameter(s) {', '.join(f'{section}.{k}' for k in unknown)}: {section} takes {sorted(allowed)}."
        )
    return params


def required(params: Mapping[str, Any] | None, key: str, section: str) -> Any:
    """``params[key]``, or :class:`ConfigError` naming ``section.key`` when the block lacks it."""
    if not params or key not in params:
        raise ConfigError(f"The parameter {section}.{key} is missing (conf/base/parameters_*.yml sets it).")
    return params[key]


def training_settings(shared: Mapping[str, Any] | None, own: Mapping[str, Any] | None) -> dict[str, Any]:
    """A model's training settings: the shared ``training`` block, then the model's own ``training`` keys."""
    return {**dict(shared or {}), **dict(own or {})}


@contextlib.contextmanager
def conf_errors(
    section: str,
    *,
    shared_training: Mapping[str, Any] | None = None,
    own_training: Mapping[str, Any] | None = None,
    arguments: Mapping[str, str] | None = None,
) -> Iterator[None]:
    """Re-raise a model's :class:`ParameterError` as :class:`ConfigError`, and a :class:`TrainingError`
    with its advice, naming conf keys: ``<section>.model.<name>`` for a module's hyperparameter, the
    training key the user set (``<section>.training.<name>``, else ``training.<name>``), and for the
    arguments of the call the keys ``arguments`` maps them to (e.g. ``rotation`` ->
    ``linear_model.factors.rotation``)."""
    own, shared, mapped = dict(own_training or {}), dict(shared_training or {}), dict(arguments or {})

    def key(group: str | None, name: str) -> str:
        if group == "training":
            if name not in own and name in shared:
                return f"training.{name}"
            return f"{section}.training.{name}"
        if group == "model":
            return f"{section}.model.{name}"
        return mapped.get(name, f"{section}.{name}")

    try:
        yield
    except ParameterError as err:
        names = [key(err.group, n.strip()) for n in err.name.split(",")]
        raise ConfigError(f"{', '.join(names)} {err.detail}") from None
    except TrainingError as err:
        raise err.renamed(key) from None
