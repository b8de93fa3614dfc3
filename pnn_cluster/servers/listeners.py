"""Listening sockets for the device server: ``tcp://HOST:PORT`` and ``ipc://PATH`` endpoints, bound as libzmq would."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import tempfile
from dataclasses import dataclass

from pnn_cluster.servers import BindError

__all__ = ["Listener", "listen"]

LISTEN_BACKLOG = 64


@dataclass
class Listener:
    """A bound, listening socket and the endpoint a client connects to."""

    sock: socket.socket
    endpoint: str
    path: str | None = None  # an ipc socket file, removed on close
    tempdir: str | None = None
    closed: bool = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.sock.close()
        if self.path is not None:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)
        if self.tempdir is not None:
            shutil.rmtree(self.tempdir, ignore_errors=True)


def listen(endpoint: str) -> Listener:
    """Bind and listen: ``tcp://HOST:PORT`` (PORT ``*`` or 0: any free port; HOST ``*``: every IPv4
    interface) or ``ipc://PATH`` (a Unix socket; ``ipc://*``: a fresh temporary path; ``ipc://@NAME``:
    Linux abstract namespace). The returned endpoint names the port or path actually bound."""
    scheme, sep, addr = endpoint.partition("://")
    try:
        if sep and scheme == "tcp":
            return _listen_tcp(endpoint, addr)
        if sep and scheme == "ipc":
            return _listen_ipc(endpoint, addr)
    except OSError as exc:
        raise BindError(f"bind: cannot bind {endpoint}: {exc}") from None
    raise BindError(f"bind: {endpoint!r}: transport not served; allowed: tcp://HOST:PORT, ipc://PATH")


def _listen_tcp(endpoint: str, addr: str) -> Listener:
    host, sep, port_s = addr.rpartition(":")
    if not sep or not host:
        raise BindError(f"bind: {endpoint!r} has no port; allowed: tcp://HOST:PORT (PORT 0 or * for any)")
    port = 0 if port_s in ("*", "0") else int(port_s) if port_s.isdigit() else -1
    if not 0 <= port < 65536:
        raise BindError(f"bind: port {port_s!r}; allowed: 1..65535, 0 or *")
    h = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if h == "*":
        family, sockaddr = socket.AF_INET, ("0.0.0.0", port)
    else:
        infos = socket.getaddrinfo(h, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        # like libzmq without ZMQ_IPV6: a name resolves to IPv4 where it can; an IPv6 literal stays IPv6
        infos.sort(key=lambda i: i[0] != socket.AF_INET)
        family, sockaddr = infos[0][0], infos[0][4]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # rebind at once after a restart
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    ip, bound = sock.getsockname()[:2]
    return Listener(sock, f"tcp://[{ip}]:{bound}" if family == socket.AF_INET6 else f"tcp://{ip}:{bound}")


def _listen_ipc(endpoint: str, path: str) -> Listener:
    tempdir = None
    if path == "*":
        tempdir = tempfile.mkdtemp(prefix="pnn-zmtp-")
        path = os.path.join(tempdir, "socket")
    if not path:
        raise BindError(f"bind: {endpoint!r} has no path; allowed: ipc://PATH, ipc://*")
    abstract = path.startswith("@")
    if not abstract and os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise BindError(f"bind: cannot bind {endpoint}: {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(path)
        except OSError:
            os.unlink(path)  # a socket file left behind by a server that is gone
        else:
            raise BindError(f"bind: cannot bind {endpoint}: another server is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("\0" + path[1:] if abstract else path)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        if tempdir is not None:
            shutil.rmtree(tempdir, ignore_errors=True)
        raise
    return Listener(sock, f"ipc://{path}", None if abstract else path, tempdir)
