"""Secret files only their owner may read, checked by whatever reads one when it starts.

A key or a password in a file is as secret as the file's mode keeps it: on a lab machine every user can
read a file whose mode says ``others: read``, and every member of its group one whose mode says ``group:
read``. So each process that reads a secret (the device server its CURVE key pair, ``pnn-cluster submit``
the Ray token, a job its MLflow credentials, a Ray node all of these) refuses a file whose mode gives its
group or others any access, in one line that names the file, its mode and the ``chmod`` that fixes it,
before it uses the secret. A directory whose files grant access (a device server's allowed client keys) is
checked for writing only: whoever may write into it may add a key.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["SharedSecretFile", "check_not_writable_by_others", "check_owner_only"]


class SharedSecretFile(ValueError):
    """A secret file (or a directory of trusted keys) that others may read or change, in one line: ``what``
    and ``path``, the ``problem`` (its mode and who gets in) and what is ``allowed`` (the ``chmod`` to run)."""

    def __init__(self, what: str, path: str | os.PathLike, problem: str, allowed: str) -> None:
        self.what, self.path, self.problem, self.allowed = what, Path(path), problem, allowed
        super().__init__(f"{what} {path}: {problem}; allowed: {allowed}")

    def __reduce__(self):
        return type(self), (self.what, self.path, self.problem, self.allowed)


def _who(bits: int) -> str:
    return " and ".join(w for w, mask in (("group", 0o070), ("others", 0o007)) if bits & mask)


def _check(path: str | os.PathLike, what: str, denied: int, grants: str, allowed: str, fix: str) -> Path:
    """``path`` when its mode has none of the ``denied`` bits; else :class:`SharedSecretFile` naming who they
    let in (``FileNotFoundError`` and other ``OSError`` as ``os.stat`` raises them)."""
    path = Path(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & denied:
        raise SharedSecretFile(what, path, f"mode {mode:04o} {grants.format(who=_who(mode & denied))}",
                               f"{allowed} ({fix} {path})")
    return path


def check_owner_only(path: str | os.PathLike, what: str) -> Path:
    """``path`` when its mode gives neither its group nor others any access; else :class:`SharedSecretFile`."""
    return _check(path, what, 0o077, "gives {who} access", "its owner only", "chmod 600")


def check_not_writable_by_others(path: str | os.PathLike, what: str) -> Path:
    """``path`` when neither its group nor others may write to it; else :class:`SharedSecretFile`."""
    return _check(path, what, 0o022, "lets {who} write to it", "written by its owner only", "chmod go-w")
