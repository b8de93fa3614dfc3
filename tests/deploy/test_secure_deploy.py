"""deploy/README.md followed on loopback: each piece of the lab with its protection on, and a training through them.

Brought up from the shipped files, in temporary directories (``etc/`` stands for ``/etc/pnn-cluster``, ``home/``
for the home of the user ``pnn`` that runs Ray):

- the token, the keys and the certificates, made by the documented steps (``ray get-auth-token``, ``pnn-cluster
  keys``, ``deploy/ray/make-tls.sh`` for this machine's names and addresses), and the jobs' MLflow credentials
  file linked where MLflow reads it; ``pnn-cluster check-secrets`` passes them before Ray starts;
- the optics device server: ``pnn-cluster serve-device`` with the arguments of ``serve-device-optics.env``
  (CURVE), bound to loopback instead of every interface;
- the electronics bench: ``pnn-cluster sim-instrument`` with ``sim-instrument-circuit.env``'s arguments (loopback);
- MLflow as ``mlflow-server.service`` runs it (basic auth, HTTPS with the certificate ``install-secrets.sh`` made,
  its secret key and admin password from the env file that script wrote), with SQLite in place of PostgreSQL;
- a Ray head as ``cluster.yaml`` starts it: token authentication, TLS on its gRPC (the environment of its start
  command), the dashboard and job API on loopback, on ports of its own; in front of the dashboard, an HTTPS
  proxy as ``dashboard-proxy.conf`` configures nginx (in this process: TLS with the pair ``make-tls.sh dashboard``
  made, every byte passed on to the dashboard).

Then two lab users, one after the other, ``pnn-cluster submit`` ``pnn-cluster train lab_cluster.yaml`` as a Ray
job through the proxy, checking its certificate against the lab CA; each job logs to MLflow as the jobs' account
from ``~/.mlflow/credentials`` (the admin made it with ``grant-access.py``), and each user's run must be in
MLflow exactly once, with its metrics, tagged with its submitter. No password may be in Ray's logs afterwards.
Each piece must refuse a client without its credentials.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, free_port

DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
PNN = str(BIN / "pnn-cluster")
LAB = ROOT / "pnn_cluster" / "configs" / "lab_cluster.yaml"


def env_file(path: Path) -> dict[str, str]:
    """A systemd EnvironmentFile's KEY=VALUE lines (values optionally quoted)."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            out[key] = value
    return out


def exec_start(path: Path) -> str:
    return next(line.partition("=")[2] for line in path.read_text().splitlines() if line.startswith("ExecStart="))


class Service:
    """A process of the deployment in its own process group, its output read line by line as it comes."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._done = False
        self._cond = threading.Condition()
        threading.Thread(target=self._read, name=f"read-{name}", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match:
        """The first output line matching ``pattern``; fails when the process ends or the time is up first."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if m := re.search(pattern, line):
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._done or left <= 0:
                    why = f"ended with {self.proc.poll()}" if self._done else f"no {pattern!r} within {timeout_s} s"
                    pytest.fail(f"{self.name}: {why}:\n{self.output()[-4000:]}")
                self._cond.wait(left)

    def output(self) -> str:
        return "".join(self.lines)

    def terminate(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def stop(self, grace_s: float = 30) -> None:
        """SIGTERM to the process group, then SIGKILL to what is left of it after ``grace_s``."""
        self.terminate()
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # also whatever the leader started and left behind
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


def run_ok(argv: list[str], env: dict[str, str], timeout_s: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{shlex.join(argv)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def _localize(text: str, etc: Path, home: Path) -> str:
    """A shipped path on a lab machine -> its stand-in in this test's directories."""
    return text.replace("/etc/pnn-cluster", str(etc)).replace("/home/pnn", str(home))


class HttpsProxy:
    """``dashboard-proxy.conf`` on loopback: TLS with the dashboard's key pair in front of the dashboard's plain
    HTTP, every byte passed on both ways (websockets too), on an event loop of its own (nginx on a real head)."""

    def __init__(self, cert: Path, key: Path, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="https-proxy", daemon=True).start()

        async def listen() -> asyncio.Server:
            return await asyncio.start_server(self._connection, "127.0.0.1", 0, ssl=ctx)

        self.server = asyncio.run_coroutine_threadsafe(listen(), self.loop).result(30)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


def _service_lines(path: Path, key: str) -> list[str]:
    return [line.partition("=")[2] for line in path.read_text().splitlines() if line.startswith(f"{key}=")]


def _https(url: str, ca: Path | None, user: str | None = None, password: str | None = None,
           data: dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a request to the MLflow server, trusting ``ca``, with basic auth if given."""
    import base64

    req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json"})
    if user is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    ctx = ssl.create_default_context(cafile=str(ca)) if ca is not None else ssl.create_default_context()
    try:
        with urllib.request.urlopen(req, timeout=60, context=ctx) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def _start_env(commands: list[str], etc: Path, home: Path) -> dict[str, str]:
    """The variables a start command of cluster.yaml sets (``export A=1 B=2 && ...``), localized."""
    return {m.group(1): _localize(m.group(2), etc, home)
            for m in re.finditer(r"\b([A-Z_]+)=(\S+)", " ".join(commands))}


@pytest.fixture(scope="module")
def lab(tmp_path_factory, mlflow_template):
    """Every documented piece, up on loopback; yields their addresses and credentials, stops them after."""
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs mlflow[auth] (Flask-WTF)")
    if not (BIN / "ray").exists() or not shutil.which("openssl"):
        pytest.skip("needs the ray command line and openssl")
    from ray.util import get_node_ip_address

    base = tmp_path_factory.mktemp("lab")
    etc, home, ray_temp = base / "etc", base / "home", Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    etc.mkdir()
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "RAY_")) and k not in ("PYTEST_CURRENT_TEST",)}
    # as the README's shells: RAY_AUTH_MODE=token everywhere, the token and keys in the home directory
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", TQDM_DISABLE="1",
               OMP_NUM_THREADS="1", RAY_AUTH_MODE="token")
    services: list[Service] = []
    proxy = None
    try:
        # -- step 1: the cluster's token, and the TLS pairs for every name and address of the cluster's one node
        # (Ray's nodes reach each other at the address Ray picks, and check it against the certificate)
        run_ok(["sh", "-c", "umask 077 && ray get-auth-token --generate"], env)
        token_file = home / ".ray" / "auth_token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        node_ip = get_node_ip_address()
        run_ok(["sh", str(DEPLOY / "ray/make-tls.sh"), "ray", socket.gethostname(), node_ip], env)
        proxy_tls = home / ".pnn-cluster-ca/dashboard"  # the proxy's pair: for the head only, beside the CA's key
        run_ok(["sh", str(DEPLOY / "ray/make-tls.sh"), "dashboard", "localhost"],
               {**env, "PNN_TLS_DIR": str(proxy_tls)})
        tls = home / ".pnn-cluster/tls"
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in tls.iterdir()} == {
            "ray.key": 0o600, "ray.crt": 0o644, "ca.crt": 0o644}
        assert stat.S_IMODE((home / ".pnn-cluster-ca").stat().st_mode) == 0o700
        assert not list(home.glob(".pnn-cluster/**/ca.key"))  # the CA's key stays outside what nodes get

        # -- step 2: MLflow's secrets and certificate, then the server as its unit runs it (the slowest to start)
        run_ok(["sh", str(DEPLOY / "mlflow/install-secrets.sh"), "localhost", "127.0.0.1"],
               {**env, "PNN_ETC": str(etc)})
        shutil.copy(etc / "mlflow/tls.crt", home / ".pnn-cluster/mlflow.crt")  # every node trusts it
        mlflow_port = free_port()
        shutil.copyfile(mlflow_template, base / "mlflow.db")  # its store with the tables made (migrations take seconds)
        service = DEPLOY / "mlflow/mlflow-server.service"
        auth_ini = etc / "basic_auth.ini"
        auth_ini.write_text(re.sub(r"database_uri = \S+", f"database_uri = sqlite:///{base / 'auth.db'}",
                                   (DEPLOY / "mlflow/basic_auth.ini").read_text()))
        mlflow_env = dict(env)
        for assignment in _service_lines(service, "Environment"):
            k, _, v = assignment.partition("=")
            mlflow_env[k] = _localize(v, etc, home).replace("%d", str(etc / "mlflow"))  # %d: its credentials
        for env_path in _service_lines(service, "EnvironmentFile"):
            mlflow_env.update(env_file(Path(_localize(env_path, etc, home))))
        assert mlflow_env["MLFLOW_AUTH_CONFIG_PATH"] == str(auth_ini)
        argv = shlex.split(_localize(exec_start(service), etc, home).replace("%d", str(etc / "mlflow")))
        argv[0] = str(BIN / "mlflow")
        replace = {"--host": "127.0.0.1", "--port": str(mlflow_port), "--workers": "1",
                   "--backend-store-uri": f"sqlite:///{base / 'mlflow.db'}",
                   "--artifacts-destination": f"file://{base / 'artifacts'}",
                   "--allowed-hosts": f"127.0.0.1:{mlflow_port},localhost:{mlflow_port}"}
        argv = [replace.get(argv[i - 1], a) if i else a for i, a in enumerate(argv)]
        services.append(mlflow := Service("mlflow", argv, mlflow_env))
        # the jobs' account's credentials, with the cluster's files; the account is made once MLflow answers
        jobs_password = secrets.token_hex(12)
        credentials = os.open(home / ".pnn-cluster/mlflow-credentials", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(credentials, "w") as f:  # as the README's umask 077, printf and editor leave it
            f.write(f"[mlflow]\nmlflow_tracking_username = pnn-jobs\nmlflow_tracking_password = {jobs_password}\n")
        # step 5's link, in the node's home (cluster.yaml's setup command is the same)
        run_ok(["sh", "-c", "cd && mkdir -p -m 700 .mlflow && ln -sfn ~/.pnn-cluster/mlflow-credentials "
                ".mlflow/credentials"], env)

        # -- step 3: the cluster's CURVE key pair; the lab PC's server key pair, the cluster allowed; the server
        # and the SCPI bench as their units run them
        run_ok([PNN, "keys", str(home / ".pnn-cluster/curve"), "cluster"], env)
        curve = etc / "curve"
        run_ok([PNN, "keys", str(curve), "optics"], env)
        (curve / "clients").mkdir()
        shutil.copy(home / ".pnn-cluster/curve/cluster.key", curve / "clients")
        shutil.copy(curve / "optics.key", home / ".pnn-cluster/curve")
        zmq_port = free_port()
        args = _localize(env_file(DEPLOY / "systemd/serve-device-optics.env")["PNN_SERVE_DEVICE_ARGS"], etc, home)
        args = args.replace("tcp://0.0.0.0:5555", f"tcp://127.0.0.1:{zmq_port}")
        services.append(optics := Service("serve-device", [PNN, "serve-device", *shlex.split(args),
                                                          "--no-latency", "--seed", "31"], env))
        args = env_file(DEPLOY / "systemd/sim-instrument-circuit.env")["PNN_SIM_INSTRUMENT_ARGS"]
        args = args.replace("--port 5025", "--port 0")
        services.append(bench := Service("sim-instrument", [PNN, "sim-instrument", *shlex.split(args),
                                                            "--no-latency", "--seed", "32"], env))

        # -- step 4: the head as cluster.yaml starts it (its environment: token, TLS, the MLflow certificate),
        # after check-secrets, declaring both instruments (this one machine is the whole lab)
        dash, gcs = free_port(), free_port()
        cluster = yaml.safe_load((DEPLOY / "ray/cluster.yaml").read_text())
        head_env = {**env, **_start_env(cluster["head_start_ray_commands"], etc, home)}
        assert head_env["RAY_AUTH_MODE"] == "token" and head_env["RAY_USE_TLS"] == "1"
        assert head_env["RAY_TLS_SERVER_KEY"] == str(tls / "ray.key")
        assert "--dashboard-host=127.0.0.1" in " ".join(cluster["head_start_ray_commands"])
        checked = run_ok([PNN, "check-secrets"], head_env).stdout
        assert str(tls / "ray.key") in checked and str(home / ".mlflow/credentials") in checked
        resources = json.dumps({"instrument:shg-bench": 1, "instrument:circuit-bench": 1})
        services.append(head := Service("ray head", [
            str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--include-dashboard=true",
            f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--resources={resources}",
            f"--temp-dir={ray_temp}", "--disable-usage-stats",
            # the session's own test cluster may run beside it: no port of Ray's defaults is shared
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--ray-client-server-port={free_port()}"], head_env))
        proxy = HttpsProxy(proxy_tls / "dashboard.crt", proxy_tls / "dashboard.key", dash)

        zmq_endpoint = optics.wait_for(r"serving .* on (tcp://\S+) \(CURVE on\)", 120).group(1)
        source = bench.wait_for(r"source \(\w+\): (TCPIP::\S+)", 120).group(1)
        sink = bench.wait_for(r"sink \(\w+\): (TCPIP::\S+)", 120).group(1)
        head.wait_for(r"Ray runtime started", 180)
        mlflow.wait_for(r"Uvicorn running on https://", 180)
        secrets_env = env_file(etc / "mlflow/mlflow.env")
        yield {
            "base": base, "etc": etc, "home": home, "env": env, "dash": f"http://127.0.0.1:{dash}",
            "https": f"https://127.0.0.1:{proxy.port}", "gcs": f"{node_ip}:{gcs}", "tls": tls,
            "ray_temp": ray_temp, "token": token_file.read_text().strip(),
            "mlflow": f"https://127.0.0.1:{mlflow_port}", "ca": home / ".pnn-cluster/mlflow.crt",
            "admin": secrets_env["MLFLOW_AUTH_ADMIN_PASSWORD"], "jobs_password": jobs_password,
            "zmq": zmq_endpoint, "source": source, "sink": sink,
        }
    finally:
        if proxy is not None:
            proxy.close()
        for s in services:  # all at once: each takes a while to shut down
            s.terminate()
        grace_until = time.monotonic() + 5  # throwaway instances: what a graceful shutdown keeps is not needed
        for s in services:
            s.stop(grace_s=max(0.0, grace_until - time.monotonic()))
        shutil.rmtree(ray_temp, ignore_errors=True)


def test_device_server_answers_the_cluster_key_only(lab):
    from pnn_cluster.devices import DeviceError
    from pnn_cluster.drivers.zmq_client import ClientCurve, DeviceClient

    keys = lab["home"] / ".pnn-cluster/curve"
    ours = ClientCurve(keys / "cluster.key_secret", keys / "optics.key")
    with DeviceClient(lab["zmq"], timeout_s=20, retries=0, curve=ours) as client:
        assert client.health()["server"]["requests"] >= 0
    from pnn_cluster.commands.keys import create_key_pair

    (lab["base"] / "rogue").mkdir()
    _, rogue_pair = create_key_pair(lab["base"] / "rogue", "rogue")
    rogue = ClientCurve(rogue_pair, keys / "optics.key")
    for curve in (None, rogue):  # no CURVE at all, or a key the server does not list: never an answer
        with DeviceClient(lab["zmq"], timeout_s=1.5, retries=0, curve=curve) as client, \
                pytest.raises(DeviceError, match="no reply"):
            client.health()


def test_device_servers_and_benches_refuse_the_network_without_protection(capsys):
    from pnn_cluster.cli import main

    assert main(["serve-device", "--system", "shg", "--bind", "tcp://0.0.0.0:0", "--allow-remote"]) == 2
    assert "--allow-remote without CURVE" in capsys.readouterr().err
    assert main(["sim-instrument", "--system", "circuit", "--host", "0.0.0.0", "--port", "0", "--allow-remote"]) == 2
    assert "no authentication" in capsys.readouterr().err


def test_secret_files_others_may_read_are_refused_at_start_in_one_line(tmp_path, monkeypatch, capsys):
    from pnn_cluster.cli import main
    from pnn_cluster.commands.keys import create_key_pair
    from pnn_cluster.runner.credentials import SharedCredentialsFile, check_tracking_credentials

    password = secrets.token_hex(12)
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_USE_TLS", "RAY_TLS_SERVER_KEY", "RAY_ADDRESS",
                 "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    (tmp_path / ".mlflow").mkdir()
    credentials = tmp_path / ".mlflow/credentials"
    credentials.write_text(f"[mlflow]\nmlflow_tracking_username = pnn-jobs\nmlflow_tracking_password = {password}\n")
    token = tmp_path / ".ray/auth_token"
    token.parent.mkdir()
    token.write_text(secrets.token_hex(32))
    keys = tmp_path / "keys"
    (keys / "clients").mkdir(parents=True)
    create_key_pair(keys, "optics")
    create_key_pair(keys / "clients", "cluster")
    serve = ["serve-device", "--system", "shg", "--option", "n_in=4", "--option", "n_out=4", "--bind",
             "tcp://127.0.0.1:0", "--curve-secret", str(keys / "optics.key_secret"), "--curve-allow",
             str(keys / "clients")]
    for mode in (0o644, 0o640, 0o604):
        # a job, before it sends the credentials anywhere; a local store sends none
        credentials.chmod(mode)
        with pytest.raises(SharedCredentialsFile) as refused:
            check_tracking_credentials("https://mlflow.lab.example:5000")
        check_tracking_credentials("sqlite:///mlflow.db")
        # a node, before ray start (the token is fine, the credentials are not)
        token.chmod(0o600)
        assert main(["check-secrets"]) == 2
        err = capsys.readouterr().err
        for line in (str(refused.value), err):
            assert str(credentials) in line and f"mode {mode:04o}" in line and f"chmod 600 {credentials}" in line
            assert len(line.strip().splitlines()) == 1 and password not in line
        credentials.chmod(0o600)
        # pnn-cluster submit, before any connection: the token file
        token.chmod(mode)
        assert main(["submit", "--address", "http://127.0.0.1:9", "--", "pnn-cluster", "train", "x"]) == 2
        err = capsys.readouterr().err
        assert f"Ray token file {token}: mode {mode:04o}" in err and f"chmod 600 {token}" in err
        assert len(err.strip().splitlines()) == 1
        token.chmod(0o600)
        # the device server, before it binds: its key pair, and who may write its allowed clients
        (keys / "optics.key_secret").chmod(mode)
        assert main(serve) == 2
        err = capsys.readouterr().err
        assert f"server secret key file {keys / 'optics.key_secret'}: mode {mode:04o}" in err
        assert f"chmod 600 {keys / 'optics.key_secret'}" in err and len(err.strip().splitlines()) == 1
        (keys / "optics.key_secret").chmod(0o600)
    (keys / "clients").chmod(0o775)
    assert main(serve) == 2
    err = capsys.readouterr().err
    assert f"allowed clients {keys / 'clients'}: mode 0775 lets group write" in err and "chmod go-w" in err
    (keys / "clients").chmod(0o755)
    assert main(["check-secrets"]) == 0
    out = capsys.readouterr().out
    assert str(credentials) in out and str(token) in out


def test_submit_sends_the_token_over_https_or_loopback_only(capsys):
    from pnn_cluster.cli import main
    from pnn_cluster.commands.submit import job_address

    for address in ("http://ray-head.lab.example:8265", "ray-head.lab.example:8265", "http://192.0.2.7:8265",
                    "ray://ray-head.lab.example:10001"):
        assert main(["submit", "--address", address, "--", "pnn-cluster", "train", "x"]) == 2  # nothing sent
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"--address {address}:" in err
        assert "an https:// address" in err and "ssh -N -L 8265:127.0.0.1:8265" in err
    for address in ("https://ray-head.lab.example:8443", "http://127.0.0.1:8265", "http://localhost:8265",
                    "http://[::1]:8265", None):
        assert job_address(address, env={}) == address
    # Ray's client lets RAY_ADDRESS override its argument: checked as well
    with pytest.raises(Exception, match="plain HTTP to ray-head"):
        job_address(None, env={"RAY_ADDRESS": "http://ray-head:8265"})


def test_scpi_bench_listens_on_loopback_only(lab):
    port = int(lab["source"].split("::")[2])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # routing only, nothing is sent: this machine's outward address
            address = probe.getsockname()[0]
        except OSError:
            address = None
    if address is None or address.startswith("127."):
        pytest.skip("no non-loopback address to try")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((address, port), timeout=5).close()


def test_mlflow_refuses_anonymous_clients_plain_http_and_unknown_certificates(lab):
    url = f"{lab['mlflow']}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _https(url, lab["ca"], "admin", lab["admin"])[0] == 200
    assert _https(url, lab["ca"])[0] == 401
    assert _https(url, lab["ca"], "admin", "not-the-password")[0] == 401
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        _https(url, None, "admin", lab["admin"])  # the certificate is trusted only through its file
    plain = lab["mlflow"].replace("https://", "http://")
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"{plain}/health", timeout=30).read()


def test_ray_refuses_requests_without_the_token(lab):
    jobs = f"{lab['dash']}/api/jobs/"
    for headers, status in (({}, 401), ({"Authorization": "Bearer " + secrets.token_hex(16)}, 403)):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(jobs, headers=headers), timeout=30)
        assert refused.value.code == status
    ok = urllib.request.Request(jobs, headers={"Authorization": f"Bearer {lab['token']}"})
    with urllib.request.urlopen(ok, timeout=30) as r:
        assert r.status == 200


def test_the_job_api_is_reached_over_https_trusting_the_lab_ca_or_on_loopback_only(lab):
    jobs = f"{lab['https']}/api/jobs/"
    lab_ca = ssl.create_default_context(cafile=str(lab["tls"] / "ca.crt"))
    ok = urllib.request.Request(jobs, headers={"Authorization": f"Bearer {lab['token']}"})
    with urllib.request.urlopen(ok, timeout=30, context=lab_ca) as r:
        assert r.status == 200
    with pytest.raises(urllib.error.HTTPError) as refused:  # the proxy adds nothing: still the token
        urllib.request.urlopen(jobs, timeout=30, context=lab_ca)
    assert refused.value.code == 401
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(ok, timeout=30, context=ssl.create_default_context())
    # the dashboard itself answers on loopback only
    node_ip = lab["gcs"].rsplit(":", 1)[0]
    if node_ip.startswith("127."):
        pytest.skip("no non-loopback address to try")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((node_ip, int(lab["dash"].rsplit(":", 1)[1])), timeout=5).close()


def test_rays_grpc_speaks_mutual_tls_only(lab):
    import grpc

    tls = lab["tls"]
    pair = {"certificate_chain": (tls / "ray.crt").read_bytes(), "private_key": (tls / "ray.key").read_bytes()}
    ca = (tls / "ca.crt").read_bytes()
    channels = {
        "in clear": grpc.insecure_channel(lab["gcs"]),
        "without a client certificate": grpc.secure_channel(lab["gcs"], grpc.ssl_channel_credentials(ca)),
        "with the node's pair": grpc.secure_channel(lab["gcs"], grpc.ssl_channel_credentials(ca, **pair)),
    }
    try:
        grpc.channel_ready_future(channels["with the node's pair"]).result(timeout=30)
        for what in ("in clear", "without a client certificate"):
            with pytest.raises(grpc.FutureTimeoutError):
                grpc.channel_ready_future(channels[what]).result(timeout=1.5)
    finally:
        for channel in channels.values():
            channel.close()


def test_jobs_submitted_over_https_are_recorded_once_for_each_submitter_and_leave_no_password_in_rays_logs(lab):
    env = lab["env"]
    # step 2: the admin makes the jobs' account and grants it the experiment (the node already holds its file)
    grant = subprocess.run(
        [sys.executable, str(DEPLOY / "mlflow/grant-access.py"), "--tracking-uri", lab["mlflow"], "--create",
         "pnn-jobs", "--experiment", "lab-hybrid"], cwd=ROOT, input=lab["jobs_password"] + "\n", text=True,
        capture_output=True, timeout=120,
        env={**env, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": lab["admin"],
             "MLFLOW_TRACKING_SERVER_CERT_PATH": str(lab["ca"])})
    assert grant.returncode == 0, grant.stdout + grant.stderr
    runtime_env = yaml.safe_load((DEPLOY / "ray/runtime-env.yaml").read_text())
    runtime_env.pop("pip")  # pnn-cluster is installed on this "cluster" already; the lab's git server is not here
    runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] = lab["mlflow"]
    runtime_env_file = lab["base"] / "runtime-env.yaml"
    runtime_env_file.write_text(yaml.safe_dump(runtime_env))
    train = ["pnn-cluster", "train", str(LAB), "--quick", "--json", "--no-progress", "--tracking-uri", lab["mlflow"],
             "--set", f"devices.optics.driver.address={lab['zmq']}",
             "--set", f"devices.circuit.driver.source.resource={lab['source']}",
             "--set", f"devices.circuit.driver.sink.resource={lab['sink']}",
             # small and quick: what is tested is the way through the deployment, not the training
             "--set", "dataset.train_subset=300", "--set", "dataset.test_subset=100",
             "--set", "devices.optics.twin.kind=ideal", "--set", "devices.circuit.twin.kind=ideal",
             "--set", "devices.circuit.placement.twins.actors=1",
             # the run's local record in this test's directory; the trained models stay there (no upload)
             "--set", f"tracking.runs_dir={lab['base'] / 'pnn-runs'}", "--set", "tracking.log_models=false",
             "--set", "tracking.end_wait_s=120"]
    # through the HTTPS proxy, its certificate checked against the lab CA (~/.pnn-cluster/tls/ca.crt by default)
    submit = [PNN, "submit", "--address", lab["https"], "--runtime-env", str(runtime_env_file), "--", *train]
    outs, results = {}, {}
    for who in ("ada", "bob"):  # two lab users, one after the other, through the one jobs' account
        submitter = {**env, "LOGNAME": who, "USER": who}
        deadline = time.monotonic() + 60
        while True:  # the head's job agent registers a little after "Ray runtime started"
            job = subprocess.run(submit, cwd=ROOT, env=submitter, capture_output=True, text=True, timeout=600)
            if "No available agent" not in job.stdout + job.stderr or time.monotonic() > deadline:
                break
        out = outs[who] = job.stdout + job.stderr
        assert job.returncode == 0, out[-6000:]
        assert f"as {who} (its runs are tagged pnn.submitter={who}" in out
        result = results[who] = json.loads(next(line for line in reversed(out.splitlines())
                                                if line.startswith('{"config"')))
        assert result["state"] == "finished" and result["device_actors"] == 2 and result["trainer_actor"] is True
        assert result["tracking_unsent"] == 0
    result, out = results["ada"], outs["ada"]

    # each submitter's run recorded exactly once
    search = f"{lab['mlflow']}/api/2.0/mlflow/runs/search"
    status, body = _https(f"{lab['mlflow']}/api/2.0/mlflow/experiments/get-by-name?experiment_name=lab-hybrid",
                          lab["ca"], "pnn-jobs", lab["jobs_password"])
    assert status == 200
    experiment = body["experiment"]["experiment_id"]
    for who in ("ada", "bob"):
        status, body = _https(search, lab["ca"], "pnn-jobs", lab["jobs_password"],
                              data={"experiment_ids": [experiment],
                                       "filter": f"tags.`pnn.submitter` = '{who}'"})
        assert status == 200, body
        assert [r["info"]["run_id"] for r in body.get("runs", [])] == [results[who]["run_id"]], body

    # the run, with its metrics, recorded by the jobs' account and tagged with its submitter
    url = f"{lab['mlflow']}/api/2.0/mlflow/runs/get?run_id={result['run_id']}"
    status, body = _https(url, lab["ca"], "pnn-jobs", lab["jobs_password"])
    assert status == 200
    run = body["run"]
    assert run["info"]["status"] == "FINISHED"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["pnn.submitter"] == "ada" and tags["mlflow.user"] == "ada"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert {"test_acc", "val_acc"} <= set(metrics) and metrics["test_acc"] == pytest.approx(result["test_acc"])
    assert _https(url, lab["ca"])[0] == 401

    # Ray logged the job's runtime environment (the submitter is there), and no password, nor the token
    logs = lab["ray_temp"]
    found = subprocess.run(["grep", "-rlF", "PNN_CLUSTER_SUBMITTER", str(logs)], capture_output=True, text=True)
    assert found.returncode == 0 and "runtime_env" in found.stdout, found
    for secret in (lab["jobs_password"], lab["admin"], lab["token"]):
        leaked = subprocess.run(["grep", "-rlF", secret, str(logs)], capture_output=True, text=True)
        assert leaked.returncode == 1, f"a secret in Ray's logs: {leaked.stdout}"
    assert not any(lab["jobs_password"] in o for o in outs.values())


# -- the commands the steps use, without servers -------------------------------------------------------------------


def test_keys_are_private_never_overwritten_and_load_as_zmq_certificates(tmp_path):
    import zmq.auth

    from pnn_cluster.commands import UsageError
    from pnn_cluster.commands.keys import create_key_pair

    public, pair = create_key_pair(tmp_path, "optics")
    assert stat.S_IMODE(pair.stat().st_mode) == 0o600 and stat.S_IMODE(public.stat().st_mode) == 0o644
    pub, sec = zmq.auth.load_certificate(str(pair))
    assert sec is not None and zmq.auth.load_certificate(str(public)) == (pub, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optics.key", "optics.key_secret"]  # no scratch left
    with pytest.raises(UsageError, match="exists"):
        create_key_pair(tmp_path, "optics")
    assert zmq.auth.load_certificate(str(pair))[1] == sec  # refused: untouched
    create_key_pair(tmp_path, "optics", force=True)
    assert zmq.auth.load_certificate(str(pair))[1] != sec
    with pytest.raises(UsageError, match="key name"):
        create_key_pair(tmp_path, "../escape")


def test_submit_adds_no_secret_to_the_runtime_environment_and_refuses_one(tmp_path, capsys):
    from pnn_cluster.cli import main
    from pnn_cluster.commands import UsageError
    from pnn_cluster.commands.submit import SUBMITTER_ENV, job_runtime_env

    env = job_runtime_env(DEPLOY / "ray/runtime-env.yaml", ".", "ada")
    shipped = yaml.safe_load((DEPLOY / "ray/runtime-env.yaml").read_text())
    assert env["pip"] == shipped["pip"] and env["working_dir"] == "."
    # the shipped variables and the submitter's name, nothing else: no credential travels with the job
    assert env["env_vars"] == {**shipped["env_vars"], SUBMITTER_ENV: "ada"}
    assert not [k for k in env["env_vars"] if re.search("PASSWORD|TOKEN|SECRET|CREDENTIAL", k)]
    password = secrets.token_hex(12)
    for name in ("MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_TOKEN"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"env_vars": {**shipped["env_vars"], name: password}}))
        with pytest.raises(UsageError, match=f"env_vars.{name}: a secret in the job's runtime environment"):
            job_runtime_env(path, None, "ada")
        assert main(["submit", "--address", "http://127.0.0.1:9", "--runtime-env", str(path), "--", "true"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and password not in err and "~/.mlflow/credentials" in err
    path = tmp_path / "paths.yaml"  # a variable that names a file holds no secret
    path.write_text(yaml.safe_dump({"env_vars": {"RAY_AUTH_TOKEN_PATH": "/home/pnn/.ray/auth_token"}}))
    assert job_runtime_env(path, None)["env_vars"] == {"RAY_AUTH_TOKEN_PATH": "/home/pnn/.ray/auth_token"}


def test_train_tags_its_run_with_the_submitter_named_in_the_job(monkeypatch):
    from pnn_cluster.commands.submit import SUBMITTER_ENV
    from pnn_cluster.commands.train import submitter_tags

    monkeypatch.delenv(SUBMITTER_ENV, raising=False)
    assert submitter_tags() == {}
    monkeypatch.setenv(SUBMITTER_ENV, "ada")
    assert submitter_tags() == {"pnn.submitter": "ada", "mlflow.user": "ada"}


def _unit_settings(path: Path) -> dict[str, list[str]]:
    """Every ``KEY=VALUE`` of a unit's [Service] section (a key may repeat)."""
    out: dict[str, list[str]] = {}
    section = None
    for line in path.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_units_are_hardened_and_device_servers_run_apart_from_ray(tmp_path):
    units = {p.name: _unit_settings(p) for p in sorted((DEPLOY / "systemd").glob("*.service"))}
    assert set(units) == {"pnn-ray-node.service", "pnn-serve-device@.service", "pnn-sim-instrument@.service"}
    for name, unit in units.items():
        for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("PrivateTmp", "yes")):
            assert unit.get(key) == [value], f"{name}: {key}"
        assert unit.get("ProtectHome") in (["yes"], ["tmpfs"], ["read-only"]), name
        assert unit.get("MemoryMax"), name
    ray_user = units["pnn-ray-node.service"]["User"]
    for name in ("pnn-serve-device@.service", "pnn-sim-instrument@.service"):
        unit = units[name]
        assert unit["User"] == ["pnn-device"] != ray_user, name  # a job cannot read the server's secret key
        assert "ReadWritePaths" not in unit, f"{name}: the servers write nothing"
        assert unit["MemoryMax"] == ["512M"]
    node = units["pnn-ray-node.service"]
    assert node["ReadWritePaths"] == ["/home/pnn"] and node["BindPaths"] == ["/home/pnn"]
    assert node["ExecStartPre"] == ["/opt/pnn-cluster/venv/bin/pnn-cluster check-secrets"]
    environment = dict(e.split("=", 1) for e in node["Environment"])
    cluster = yaml.safe_load((DEPLOY / "ray/cluster.yaml").read_text())
    for commands in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        start = _start_env(commands, Path("/etc/pnn-cluster"), Path("/home/pnn"))
        for key in ("RAY_AUTH_MODE", "RAY_USE_TLS", "RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT"):
            assert start[key] == environment[key], key  # a lab PC's Ray as the head's and the GPU workers'
        assert "pnn-cluster check-secrets &&" in " ".join(commands)
    if not shutil.which("systemd-analyze"):
        pytest.skip("no systemd-analyze to verify the units with")
    # verified in a root of their own: the programs they start, stand-ins, and the system's units beside them
    root = tmp_path / "root"
    (root / "opt/pnn-cluster/venv/bin").mkdir(parents=True)
    for program in ("pnn-cluster", "ray"):
        (root / "opt/pnn-cluster/venv/bin" / program).write_text("#!/bin/sh\n")
        (root / "opt/pnn-cluster/venv/bin" / program).chmod(0o755)
    system_units = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()),
                        None)
    if system_units is None:
        pytest.skip("no system units to verify against")
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name in units:
        shutil.copy(DEPLOY / "systemd" / name, root / "etc/systemd/system" / name)
    verified = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "pnn-ray-node.service",
                               "pnn-serve-device@optics.service", "pnn-sim-instrument@circuit.service"],
                              capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0 and not (verified.stdout + verified.stderr).strip(), verified


def test_a_device_server_on_the_network_needs_curve_or_says_it_is_insecure(capsys):
    from pnn_cluster.commands import UsageError
    from pnn_cluster.commands.serve_device import check_remote

    check_remote(allow_remote=True, curve=True, insecure=False)
    check_remote(allow_remote=False, curve=False, insecure=False)
    assert capsys.readouterr().err == ""
    with pytest.raises(UsageError, match="without CURVE"):
        check_remote(allow_remote=True, curve=False, insecure=False)
    check_remote(allow_remote=True, curve=False, insecure=True)
    assert "warning: --insecure" in capsys.readouterr().err
