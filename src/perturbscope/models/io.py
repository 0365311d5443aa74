"""Model checkpoints: ``{"class", "hparams", "metadata", "state_dict"}``.

Checkpoints hold only JSON-like values and tensors, so :func:`load_model`
uses ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import torch
from torch import nn

__all__ = ["to_checkpoint", "from_checkpoint", "save_model", "load_model"]

_KEYS = ("class", "hparams", "metadata", "state_dict")


def _qualname(obj: type) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def to_checkpoint(model: nn.Module) -> dict[str, Any]:
    """Serialise a model to a plain dict.

    Parameters
    ----------
    model
        A model with ``hparams`` (constructor kwargs) and optional
        ``metadata`` (JSON-serialisable dicts).

    Returns
    -------
    dict
        ``{"class": "module.QualName", "hparams": dict, "metadata": dict,
        "state_dict": {name: CPU tensor}}``.

    Raises
    ------
    ValueError
        If the model has no ``hparams`` or hparams/metadata are not
        JSON-serialisable.
    """
    if not isinstance(getattr(model, "hparams", None), dict):
        raise ValueError(f"{type(model).__name__} has no `hparams` dict; cannot checkpoint it")
    metadata = getattr(model, "metadata", None) or {}
    for name, value in (("hparams", model.hparams), ("metadata", metadata)):
        try:
            json.dumps(value)
        except TypeError as err:
            raise ValueError(f"model.{name} must be JSON-serialisable to be checkpointed: {err}") from None
    return {
        "class": _qualname(type(model)),
        "hparams": json.loads(json.dumps(model.hparams)),
        "metadata": json.loads(json.dumps(metadata)),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }


def _import_class(path: str) -> type:
    # longest importable module prefix, then attributes (nested qualnames)
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name, qual_parts = ".".join(parts[:split]), parts[split:]
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        try:
            for attr in qual_parts:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        if isinstance(obj, type):
            return obj
        break
    raise ValueError(f"checkpoint class {path!r} cannot be imported")


def from_checkpoint(ckpt: dict[str, Any], map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from :func:`to_checkpoint` output.

    Parameters
    ----------
    ckpt
        Checkpoint dict.
    map_location
        Device to put the model on.

    Returns
    -------
    torch.nn.Module
        The model, weights loaded, in eval mode.
    """
    missing = [k for k in _KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"not a perturbscope model checkpoint: missing keys {missing}")
    cls = _import_class(ckpt["class"])
    if not issubclass(cls, nn.Module):
        raise ValueError(f"checkpoint class {ckpt['class']!r} is not a torch.nn.Module")
    model = cls(**ckpt["hparams"])
    model.load_state_dict(ckpt["state_dict"])
    model.metadata = dict(ckpt.get("metadata") or {})
    model.to(map_location)
    model.eval()
    return model


def save_model(model: nn.Module, path: str | os.PathLike) -> None:
    """Write :func:`to_checkpoint` of ``model`` to ``path`` with ``torch.save``."""
    torch.save(to_checkpoint(model), path)


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model written by :func:`save_model` (``weights_only=True``-safe)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return from_checkpoint(ckpt, map_location=map_location)
