"""A run's local record: the directory that holds its journal, its ids, its checkpoint and artifacts.

A run directory::

    pnn-runs/20261130-121500-tiny-3f2a9c1e/
      run.json              tracking URI, experiment, run id (the server's, once it exists), command
      journal.jsonl         one JSON operation per line, appended; its line number is its sequence number
      sent.json             how many journal lines the server has acknowledged
      ids.json              local run ids -> server run ids (a run created while the server was away)
      checkpoints/last.pt   the latest checkpoint (atomic, fsynced)
      files/...             every other artifact, as uploaded
      .lock                 held (flock) by the process writing the run

A run that could not be created on the server has a local id
(``local-<hex>``) until it is: operations name runs by that id and the
outbox maps it to the server's id when it creates the run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pnn_cluster.fsio import atomic_write_text, fsync_dir

__all__ = ["RunDir", "RunDirError", "default_runs_root", "find_run_dir", "is_local_id", "new_local_id",
           "server_ids_near"]


class RunDirError(RuntimeError):
    """A run directory that cannot be used (missing, not a run directory, held by another process)."""


def is_local_id(run_id: str | None) -> bool:
    return bool(run_id) and str(run_id).startswith("local-")


def new_local_id() -> str:
    return f"local-{uuid.uuid4().hex[:16]}"


#: the folder under Ray's session directory where it unpacks a job's ``working_dir`` (and other packages)
_RAY_TEMPORARY = "runtime_resources"


def default_runs_root(env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None) -> Path:
    """``PNN_RUNS_DIR``; else ``~/pnn-runs`` when the working directory is Ray's temporary copy of a job's
    working directory (under ``.../runtime_resources/``: Ray deletes it, on whichever node ran the
    process); else ``pnn-runs`` in the working directory."""
    env = os.environ if env is None else env
    if env.get("PNN_RUNS_DIR"):
        return Path(env["PNN_RUNS_DIR"]).expanduser().resolve()
    here = Path(cwd if cwd is not None else os.getcwd()).resolve()
    if _RAY_TEMPORARY in here.parts:
        return (Path(env["HOME"]) if env.get("HOME") else Path.home()).resolve() / "pnn-runs"
    return here / "pnn-runs"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:40] or "run"


class RunDir:
    """The local record of one run: see the module docstring for its layout."""

    META, JOURNAL, SENT, IDS, LOCK = "run.json", "journal.jsonl", "sent.json", "ids.json", ".lock"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).resolve()
        self._lock_fd: int | None = None
        self._journal = None
        self._io = threading.Lock()

    # -- creating, finding -----------------------------------------------------------------------------------

    @classmethod
    def create(cls, root: str | os.PathLike, name: str, meta: Mapping[str, Any]) -> RunDir:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        path = root / f"{stamp}-{_slug(name)}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        d = cls(path)
        d.write_meta({"created": time.time(), **meta})
        fsync_dir(root)
        return d

    @classmethod
    def open(cls, path: str | os.PathLike) -> RunDir:
        d = cls(path)
        if not (d.path / cls.META).is_file():
            raise RunDirError(f"{path}: not a run directory (no {cls.META}); run directories are made by "
                              f"`pnn-cluster train` under {default_runs_root()}")
        return d

    @staticmethod
    def is_run_dir(path: str | os.PathLike) -> bool:
        return (Path(path) / RunDir.META).is_file()

    # -- metadata ------------------------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / self.META).read_text())
        except (OSError, ValueError) as exc:
            raise RunDirError(f"{self.path / self.META}: unreadable ({exc})") from None

    def write_meta(self, meta: Mapping[str, Any]) -> None:
        atomic_write_text(self.path / self.META, json.dumps(dict(meta), indent=2))

    def update_meta(self, **kw: Any) -> None:
        with self._io:
            self.write_meta({**self.meta(), **kw})

    def ids(self) -> dict[str, str]:
        try:
            return json.loads((self.path / self.IDS).read_text())
        except FileNotFoundError:
            return {}

    def add_id(self, local: str, server: str) -> None:
        with self._io:
            atomic_write_text(self.path / self.IDS, json.dumps({**self.ids(), local: server}))

    @property
    def run_id(self) -> str | None:
        """The server's id of the run once it exists, else its local id."""
        rid = self.meta().get("run_id")
        return self.ids().get(rid, rid) if rid else None

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    def file(self, relative: str) -> Path:
        p = (self.path / "files" / relative).resolve()
        if self.path not in p.parents:
            raise ValueError(f"artifact path {relative!r} leaves the run directory")
        return p

    # -- the journal -------------------------------------------------------------------------------------------

    def read_journal(self) -> list[dict[str, Any]]:
        ops = []
        try:
            with open(self.path / self.JOURNAL, encoding="utf-8") as f:
                for line in f:
                    if not line.endswith("\n"):
                        break  # a line cut by a crash: never acknowledged, never replayed
                    ops.append(json.loads(line))
        except FileNotFoundError:
            pass
        return ops

    def sent(self) -> int:
        try:
            return int(json.loads((self.path / self.SENT).read_text())["sent"])
        except (FileNotFoundError, ValueError, KeyError):
            return 0

    def set_sent(self, n: int) -> None:
        # a plain replace, not fsynced: after a power cut a few operations are sent twice, and each is idempotent
        # (see the module docstring)
        tmp = self.path / f".{self.SENT}.{threading.get_ident()}.tmp"
        tmp.write_text(json.dumps({"sent": int(n)}))
        os.replace(tmp, self.path / self.SENT)

    def append(self, ops: Iterable[Mapping[str, Any]]) -> None:
        data = "".join(json.dumps(op, separators=(",", ":")) + "\n" for op in ops)
        with self._io:
            if self._journal is None:
                self._drop_cut_line()
                self._journal = open(self.path / self.JOURNAL, "a", encoding="utf-8")  # noqa: SIM115
            self._journal.write(data)
            self._journal.flush()  # in the OS's hands: a killed process loses nothing

    def _drop_cut_line(self) -> None:
        """A line a crash cut short (never acknowledged, never replayed) goes before anything is appended."""
        path = self.path / self.JOURNAL
        try:
            with open(path, "rb+") as f:
                size = f.seek(0, os.SEEK_END)
                if size == 0:
                    return
                f.seek(size - 1)
                if f.read(1) == b"\n":
                    return
                data = path.read_bytes()
                f.truncate(data.rfind(b"\n") + 1)
        except FileNotFoundError:
            pass

    def sync(self) -> None:
        """Make the journal durable (fsync): at checkpoints and at the end of a run."""
        with self._io:
            if self._journal is not None:
                self._journal.flush()
                os.fsync(self._journal.fileno())

    def pending(self) -> int:
        return max(0, len(self.read_journal()) - self.sent())

    def metric_history(self, run: str, keys: Iterable[str]) -> dict[str, list[tuple[int, float]]]:
        """Every value of ``keys`` this directory's journal holds for ``run``, by step (the last one wins)."""
        want = set(keys)
        out: dict[str, dict[int, float]] = {k: {} for k in want}
        ids = self.ids()
        same = {run} | {k for k, v in ids.items() if v == run} | ({ids[run]} if run in ids else set())
        for op in self.read_journal():
            if op.get("op") == "log_batch" and op.get("run") in same:
                for k, v, _ts, step in op.get("metrics", ()):
                    if k in want:
                        out[k][int(step)] = float(v)
        return {k: sorted(v.items()) for k, v in out.items()}

    # -- the writer's lock --------------------------------------------------------------------------------------

    def lock(self) -> None:
        """Hold the directory for this process (released when it ends, however it ends)."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.path / self.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = (self.path / self.LOCK).read_text().strip() or "another process"
            raise RunDirError(f"{self.path}: in use by {holder} (a training or a sync still writing it)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        with self._io:
            if self._journal is not None:
                self._journal.close()
                self._journal = None
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None


def find_run_dir(run_id: str, root: str | os.PathLike | None = None) -> RunDir | None:
    """The local run directory of ``run_id`` (a server or local id) under ``root``, newest first; None if none."""
    root = Path(root) if root is not None else default_runs_root()
    if not root.is_dir():
        return None
    for meta in sorted(root.glob(f"*/{RunDir.META}"), reverse=True):
        d = RunDir(meta.parent)
        try:
            m = d.meta()
        except RunDirError:
            continue
        if run_id in (m.get("run_id"), d.ids().get(m.get("run_id", ""))):
            return d
    return None


def server_ids_near(d: RunDir) -> dict[str, str]:
    """Local ids of every run directory beside ``d`` (a demo's method runs name their parent's)."""
    out: dict[str, str] = {}
    for ids in d.path.parent.glob(f"*/{RunDir.IDS}"):
        with contextlib.suppress(OSError, ValueError):
            out.update(json.loads(ids.read_text()))
    return out
