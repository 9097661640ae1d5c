"""Where a store is read from: a local directory (``pathlib.Path``) or an fsspec URL (``FsPath``).

Readers (``compute_stored``, the CLI, ``open_epoch``) accept ``s3://bucket/run``, ``gs://...``,
``file:///shared/run`` or any other fsspec URL as well as a local path; the store is then listed
and read through fsspec, and its arrays opened by zarr from the URL (so dask.distributed workers
read it themselves). Writing (the Recorder) needs a local path: atomic renames and file locks.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

__all__ = ["FsPath", "is_url", "location"]


def is_url(path: Any) -> bool:
    """True for an fsspec URL such as ``s3://bucket/run`` (``file://`` included)."""
    return isinstance(path, str) and "://" in path


class FsPath:
    """The few ``pathlib.Path`` operations the store readers use, on an fsspec filesystem."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.path = path.rstrip("/") or "/"

    def __truediv__(self, name: str) -> "FsPath":
        return FsPath(self.fs, f"{self.path}/{name}")

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "FsPath":
        return FsPath(self.fs, self.path.rsplit("/", 1)[0] or "/")

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def is_dir(self) -> bool:
        return bool(self.fs.isdir(self.path))

    def iterdir(self) -> Iterator["FsPath"]:
        for p in sorted(self.fs.ls(self.path, detail=False)):
            yield FsPath(self.fs, p)

    def read_bytes(self) -> bytes:
        return bytes(self.fs.cat_file(self.path))

    def resolve(self) -> "FsPath":
        return self

    def __str__(self) -> str:
        return self.fs.unstrip_protocol(self.path)

    def __repr__(self) -> str:
        return f"FsPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FsPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


def location(path: str | os.PathLike[str] | FsPath, **storage_options: Any) -> Any:
    """A ``pathlib.Path`` for a local path, an :class:`FsPath` for an fsspec URL."""
    from pathlib import Path

    if isinstance(path, FsPath):
        return path
    if is_url(path):
        import fsspec

        fs, root = fsspec.core.url_to_fs(path, **storage_options)
        return FsPath(fs, root)
    return Path(path)
