"""Shared filesystem helpers for perturbscope's Kedro datasets.

Writes are atomic: the payload goes to a temporary file beside the target and is
moved into place only once complete, so a crash never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
from kedro.io.core import AbstractVersionedDataset, DatasetError, Version, get_filepath_str, get_protocol_and_path


def filesystem(filepath: str, credentials: dict[str, Any] | None, fs_args: dict[str, Any] | None):
    """Return ``(protocol, path, fs)`` for an fsspec path."""
    protocol, path = get_protocol_and_path(filepath)
    if protocol == "file":
        fs_args = {"auto_mkdir": True, **(fs_args or {})}
    fs = fsspec.filesystem(protocol, **(credentials or {}), **(fs_args or {}))
    return protocol, PurePosixPath(path), fs


def write_via_local_file(protocol: str, fs, target: str, suffix: str, write: Callable[[str], None]) -> None:
    """Call ``write(local_path)`` and move the finished file to ``target``.

    Local targets get a temporary file in the same folder and an atomic
    ``os.replace``; remote targets are written locally and uploaded with ``fs.put``.
    """
    if protocol == "file":
        folder = os.path.dirname(target) or "."
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=suffix, prefix=".tmp-", dir=folder)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with tempfile.TemporaryDirectory() as tmpdir:
        local = str(Path(tmpdir) / f"payload{suffix}")
        write(local)
        fs.put(local, target)


@contextlib.contextmanager
def local_copy(fs, protocol: str, source: str) -> Iterator[str]:
    """A local path of ``source``: itself on the local filesystem, else a downloaded temporary copy (readers
    such as scanpy's ``read_10x_h5`` take a path, not a file object)."""
    if protocol == "file":
        yield str(source)
        return
    with tempfile.TemporaryDirectory() as tmpdir:
        local = str(Path(tmpdir) / PurePosixPath(str(source)).name)
        fs.get(str(source), local)
        yield local


class VersionedFileDataset(AbstractVersionedDataset):
    """What the project's file datasets share: an fsspec filesystem, versioned paths, ``_exists``."""

    def _init_file(
        self,
        filepath: str,
        version: Version | None,
        credentials: dict[str, Any] | None,
        fs_args: dict[str, Any] | None,
        metadata: dict[str, Any] | None,
    ) -> None:
        protocol, path, fs = filesystem(filepath, credentials, fs_args)
        self._protocol = protocol
        self._fs = fs
        self.metadata = metadata
        AbstractVersionedDataset.__init__(
            self, filepath=path, version=version, exists_function=fs.exists, glob_function=fs.glob
        )

    def _load_path(self) -> str:
        return get_filepath_str(self._get_load_path(), self._protocol)

    def _save_path(self) -> str:
        return get_filepath_str(self._get_save_path(), self._protocol)

    def _exists(self) -> bool:
        try:
            load_path = self._load_path()
        except DatasetError:
            return False
        return self._fs.exists(load_path)

    def _invalidate_cache(self) -> None:
        self._fs.invalidate_cache(get_filepath_str(self._filepath, self._protocol))
