"""Files that a crash cannot destroy: write beside, fsync, rename, fsync the directory.

A checkpoint or a saved twin is either the old file or the new one, whole,
after a power cut or a killed process at any instant: the new content goes
to a temporary file in the same directory, is flushed to the disk
(``fsync``), and replaces the old name in one ``os.replace``; the
directory is then fsynced so the rename itself survives.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["NotATorchFile", "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_torch_save",
           "fsync_dir", "torch_load_tensors"]


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename or a new file in it) to the disk; a no-op where unsupported."""
    try:
        fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` through ``write(fileobj)`` so that it is the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` made atomic and durable."""
    import torch

    def write(f: IO[bytes]) -> None:
        buf = io.BytesIO()
        torch.save(obj, buf)
        f.write(buf.getbuffer())

    return atomic_write(path, write)


class NotATorchFile(ValueError):
    """A file ``torch.load`` (tensors only) cannot read; the message is the reason, on one line."""


def torch_load_tensors(path: str | os.PathLike) -> Any:
    """``torch.load`` of tensors and plain containers only (never arbitrary pickles), on the CPU.

    An I/O error propagates as it is; anything else the unpickler raises on garbage (it fails in any of a
    dozen ways, each meaning "not a torch file") becomes :class:`NotATorchFile`.
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:
        detail = " ".join(str(exc).split())[:160]
        raise NotATorchFile(f"{type(exc).__name__}: {detail}") from None
