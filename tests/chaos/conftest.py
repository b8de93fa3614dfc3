"""Shared fixtures of the chaos suite: real processes on loopback, killed, stopped and restarted on purpose.

Everything here waits on something observable (a line a process printed, a
reply to ``health``, a process exit), each wait bounded by a deadline; nothing
sleeps a fixed time.

Fixture API (all processes started through a fixture are killed at teardown; ``free_port``, ``wait_until``
and ``write_config`` come from ``tests/helpers.py``, shared by every tier):

``Proc``
    A subprocess whose stdout and stderr are read line by line on threads:
    ``wait_for_line(regex, timeout, stream="stdout")`` returns the match,
    ``wait(timeout)`` the exit code, ``signal(sig)``, ``kill()``, ``pid``,
    ``stdout``/``stderr`` (the text so far), ``lines(stream)``.
``serve_device`` (fixture, a factory)
    ``serve_device(system="circuit", options={"n_in": 8, "n_out": 8}, port=None, extra=("--ideal",),
    wait=True)`` starts ``pnn-cluster serve-device`` and returns a
    :class:`ServedDevice` once it answers ``health`` (``wait=False``: at once;
    then ``ready()`` waits, so a client process can start meanwhile):
    ``endpoint``, ``port``, ``proc``,
    ``health()``, ``forwards()`` (device calls so far), ``instances`` (one
    ``server.instance`` per process started), ``kill()`` (SIGKILL,
    reaped), ``restart()`` (same port, waits for ``health`` again),
    ``pause()``/``resume()`` (SIGSTOP/SIGCONT), ``stop()`` (SIGTERM).
``run_cli`` (fixture, a factory)
    ``run_cli("train", "cfg.yaml", "--in-process", ...)`` starts ``pnn-cluster``
    with those arguments in the test's directory and returns a :class:`Proc`;
    ``train_result(proc, timeout)`` waits for it and returns
    ``(exit code, the parsed --json line or None)``.
``connections_to(port, pid=None)``
    The local ports of TCP connections to 127.0.0.1:``port`` (from ``/proc``),
    of process ``pid`` or of any process but the test's own: a new one means
    a client gave up on a socket and reconnected.
``chaos_config(endpoint, **schedule)``
    The small configuration these tests train: a digits subset, one circuit
    device (8 in, 8 out) reached over ZeroMQ at ``endpoint``, an ideal twin.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port, wait_until

#: the command line, run as a module of the interpreter running the tests (the same environment)
CLI = [sys.executable, "-m", "pnn_cluster.cli"]


class Proc:
    """A subprocess with its output read line by line, so a test can wait for what it prints."""

    def __init__(self, argv: Sequence[str], cwd: Path | str | None = None, env: dict[str, str] | None = None,
                 name: str = "") -> None:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", **(env or {})}
        self.name = name or Path(argv[0]).name
        self.argv = list(argv)
        self.started = time.monotonic()
        self.popen = subprocess.Popen(self.argv, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, bufsize=1)
        self._lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._changed = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(stream, getattr(self.popen, stream)),
                                          daemon=True, name=f"{self.name}-{stream}")
                         for stream in ("stdout", "stderr")]
        for t in self._readers:
            t.start()

    def _read(self, stream: str, pipe) -> None:
        for line in pipe:
            with self._changed:
                self._lines[stream].append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._lines[stream].append(None)  # end of stream
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def lines(self, stream: str = "stdout") -> list[str]:
        with self._changed:
            return [x for x in self._lines[stream] if x is not None]

    @property
    def stdout(self) -> str:
        return "\n".join(self.lines("stdout"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines("stderr"))

    def wait_for_line(self, pattern: str, timeout: float, stream: str = "stdout", start: int = 0) -> re.Match:
        """The first line (from line ``start`` on) that matches ``pattern``; fails the test on timeout or exit."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = start
        with self._changed:
            while True:
                lines = self._lines[stream]
                for line in lines[seen:]:
                    if line is None:
                        pytest.fail(f"{self.name} ended (exit {self.popen.wait()}) before printing a line matching "
                                    f"{pattern!r}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}")
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"{self.name}: no line matching {pattern!r} within {timeout:g} s\n"
                                f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}")
                self._changed.wait(left)

    def wait(self, timeout: float) -> int:
        """The exit code, once the process and its output are done; fails the test if it runs past ``timeout``."""
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name} still running after {timeout:g} s (killed)\nstdout:\n{self.stdout}\n"
                        f"stderr:\n{self.stderr}")
        for t in self._readers:
            t.join(10)
        return rc

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL (after SIGCONT, so a stopped process dies too) and reap."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGKILL)
                self.popen.send_signal(signal.SIGCONT)
        self.popen.wait(30)
        for t in self._readers:
            t.join(10)


def _socket_inodes(pid: int) -> set[str]:
    fd_dir = Path(f"/proc/{pid}/fd")
    inodes = set()
    for fd in fd_dir.iterdir() if fd_dir.is_dir() else ():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    return inodes


def connections_to(port: int, pid: int | None = None) -> set[int]:
    """Local ports of TCP connections (any state) to 127.0.0.1:``port``: those of process ``pid``, or with
    ``pid=None`` of every process but this one (a device actor's, say); empty where there is no /proc."""
    inodes = _socket_inodes(pid) if pid is not None else None
    ours = _socket_inodes(os.getpid()) if pid is None else set()
    out = set()
    with contextlib.suppress(OSError), open("/proc/net/tcp") as f:
        next(f)
        for row in f:
            cols = row.split()
            local, remote, inode = cols[1], cols[2], cols[9]
            r_addr, r_port = remote.split(":")
            mine = inode in inodes if inodes is not None else inode not in ours
            if mine and int(r_port, 16) == port and r_addr == "0100007F":
                out.add(int(local.split(":")[1], 16))
    return out


class ServedDevice:
    """``pnn-cluster serve-device`` in a subprocess, on a fixed loopback port (so a restart comes back there)."""

    START_TIMEOUT_S = 60.0

    def __init__(self, system: str = "circuit", options: dict[str, Any] | None = None, port: int | None = None,
                 extra: Sequence[str] = ("--ideal",), cwd: Path | str | None = None) -> None:
        self.system = system
        self.options = dict({"n_in": 8, "n_out": 8} if options is None else options)
        self.port = port or free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.extra = list(extra)
        self.cwd = cwd
        self.proc: Proc | None = None
        #: ``server.instance`` of each process started (it changes when the server restarts)
        self.instances: list[str] = []
        self._client = None

    def argv(self) -> list[str]:
        opts = [a for k, v in self.options.items() for a in ("--option", f"{k}={v}")]
        return [*CLI, "serve-device", "--system", self.system, *opts, *self.extra, "--bind", self.endpoint]

    def start(self, wait: bool = True) -> ServedDevice:
        """Start the process; with ``wait``, return once it answers ``health`` (else call :meth:`ready`)."""
        self.proc = Proc(self.argv(), cwd=self.cwd, name=f"serve-device:{self.port}")
        return self.ready() if wait else self

    def ready(self) -> ServedDevice:
        assert self.proc is not None
        self.proc.wait_for_line(r"^serving .* on tcp://", self.START_TIMEOUT_S)
        h = wait_until(self._answers, self.START_TIMEOUT_S, f"{self.endpoint} to answer health")
        self.instances.append(h["server"]["instance"])
        return self

    def _answers(self) -> dict[str, Any] | None:
        from pnn_cluster.devices.base import DeviceError

        try:
            return self.health()
        except DeviceError:
            return None

    def client(self):
        """This test's own client of the server (short timeout, no retries: a test polls, it does not wait)."""
        from pnn_cluster.drivers.zmq_client import DeviceClient

        if self._client is None:
            self._client = DeviceClient(self.endpoint, timeout_s=1.0, retries=0).connect()
        return self._client

    def health(self) -> dict[str, Any]:
        return self.client().health()

    def forwards(self) -> int:
        """Device calls served so far by this server process (forwards, calibration included)."""
        return int(self.health()["calls"])

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.signal(signal.SIGCONT)

    def restart(self) -> ServedDevice:
        """Kill (if running) and start again on the same port."""
        if self.proc is not None:
            self.proc.kill()
        # the port is ours until the next bind: a killed listener leaves no TIME_WAIT on the listening socket
        return self.start()

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.signal(signal.SIGCONT)
        self.proc.signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc is not None:
            self.proc.kill()


def chaos_config(endpoint: str, *, epochs: int = 2, batch_size: int = 8, timeout_s: float = 2.0, retries: int = 10,
                 device_timeout_s: float = 60.0, tracking: bool = False) -> dict[str, Any]:
    """A digits subset (110 train, 10 validation, 60 test) through one served 8 x 8 circuit, ideal twin.

    ``timeout_s`` and ``retries`` are the ZeroMQ driver's (each try waits ``timeout_s``, then a fresh socket
    sends again); ``device_timeout_s`` bounds one device call as the training engine sees it.
    """
    return {
        "name": "chaos",
        "dataset": {"name": "digits", "train_subset": 120, "test_subset": 60},
        "devices": {"circuit": {
            "driver": {"kind": "zmq", "address": endpoint, "timeout_s": timeout_s, "retries": retries,
                       "model": {"system": "circuit", "options": {"n_in": 8, "n_out": 8}}},
            # the ideal model, checked on a few measurements only: the calibration is not what is tested here
            "twin": {"kind": "ideal", "groups": 3, "batch": 16},
            "timeout_s": device_timeout_s}},
        "stack": [{"kind": "linear", "size": 8}, {"kind": "rescale"}, {"kind": "physical", "device": "circuit"},
                  {"kind": "linear", "size": 10}],
        "optimizer": {"lr": 0.05},
        "schedule": {"epochs": epochs, "batch_size": batch_size, "eval_batch": 60},
        "tracking": {"enabled": tracking, "experiment": "chaos", "log_models": False},
    }


#: training samples of chaos_config's dataset (120 digits less the 10 of the validation split)
TRAIN_SAMPLES = 110


def steps_per_epoch(batch_size: int) -> int:
    return -(-TRAIN_SAMPLES // batch_size)


@pytest.fixture
def serve_device(tmp_path) -> Iterator[Callable[..., ServedDevice]]:
    started: list[ServedDevice] = []

    def start(system: str = "circuit", options: dict[str, Any] | None = None, port: int | None = None,
              extra: Sequence[str] = ("--ideal",), wait: bool = True) -> ServedDevice:
        served = ServedDevice(system, options, port, extra, cwd=tmp_path)
        started.append(served)
        return served.start(wait)

    yield start
    for served in started:
        served.close()


@pytest.fixture
def run_cli(tmp_path) -> Iterator[Callable[..., Proc]]:
    procs: list[Proc] = []

    def run(*args: str, env: dict[str, str] | None = None) -> Proc:
        proc = Proc([*CLI, *map(str, args)], cwd=tmp_path, env=env, name=f"pnn-cluster {args[0]}")
        procs.append(proc)
        return proc

    yield run
    for proc in procs:
        proc.kill()


def train_result(proc: Proc, timeout: float) -> tuple[int, dict[str, Any] | None]:
    """Wait for a ``train --json`` process; its exit code and its JSON result line (None if it printed none)."""
    import json

    rc = proc.wait(timeout)
    result = None
    for line in proc.lines("stdout"):
        if line.startswith("{") and line.endswith("}"):
            with contextlib.suppress(ValueError):
                result = json.loads(line)
    return rc, result


def assert_no_traceback(proc: Proc) -> None:
    assert "Traceback" not in proc.stderr, f"{proc.name} printed a traceback:\n{proc.stderr}"
