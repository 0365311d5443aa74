"""Names that become paths: screen names (folders, MLflow experiments) and perturbation labels (file names).

A screen's name is part of every output path and of its MLflow experiment's name, so it is checked where it
enters (``--params screen=...``, the screens registry, the retrain CLI) against one rule: letters, digits,
``_`` and ``-``, starting with a letter or digit. A perturbation label comes from the user's data and may hold
anything (``/``, ``..``, spaces, a leading dot); :func:`file_names` turns labels into file names that are
visible, unique and readable: a slug of the label, plus a short hash of the label where the slug is not the
label itself (so two labels that differ only in characters a file name cannot hold stay two files).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

__all__ = ["SCREEN_NAME_RULE", "ScreenNameError", "check_screen_name", "file_names", "slug"]

SCREEN_NAME_RULE = "letters, digits, '_' and '-', starting with a letter or digit"
_SCREEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9+_.-]+")
_MAX_SLUG = 80


class ScreenNameError(ValueError):
    """A screen name that cannot be a folder name; the message gives the rule."""


def check_screen_name(name: object, where: str = "screen") -> str:
    """``name`` as a string when it follows :data:`SCREEN_NAME_RULE`, else :class:`ScreenNameError`."""
    text = str(name)
    if not _SCREEN.match(text):
        raise ScreenNameError(
            f"{where}={text!r} is not a valid screen name: use {SCREEN_NAME_RULE} (it becomes a folder under "
            f"data/ and part of the MLflow experiment's name), e.g. {_suggest(text)!r}."
        )
    return text


def _suggest(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_-")
    return cleaned or "my_screen"


def slug(label: str) -> str:
    """A visible file-name stem for ``label``: runs of characters other than letters, digits, ``+``, ``_``,
    ``.`` and ``-`` become ``_``, leading dots and underscores go, at most 80 characters."""
    stem = _UNSAFE.sub("_", str(label)).lstrip("._").rstrip(".")
    return stem[:_MAX_SLUG] or "unnamed"


def file_names(labels: Iterable[str], suffix: str = "") -> dict[str, str]:
    """One distinct, visible file name per label (``label -> name + suffix``).

    A label that is already a safe stem keeps it (``STAT1`` -> ``STAT1.png``); any other gets its slug and
    the first 8 hex digits of the label's SHA-1 (``../evil+A/B`` -> ``evil+A_B-fef082bb.png``), so labels
    that differ only in characters a file name cannot hold never share a file.
    """
    out: dict[str, str] = {}
    seen: set[str] = set()
    for label in dict.fromkeys(str(label) for label in labels):
        stem = slug(label)
        if stem != label:
            stem = f"{stem}-{hashlib.sha1(label.encode('utf-8')).hexdigest()[:8]}"
        name = f"{stem}{suffix}"
        while name.lower() in seen:  # case-insensitive file systems: STAT1 and stat1 must not share a file
            stem = f"{stem}-{hashlib.sha1(stem.encode('utf-8')).hexdigest()[:4]}"
            name = f"{stem}{suffix}"
        seen.add(name.lower())
        out[label] = name
    return out
