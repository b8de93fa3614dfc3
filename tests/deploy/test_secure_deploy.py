"""deploy/README.md followed on loopback: each piece of the lab with its protection on, and a training through them.

Brought up from the shipped files, in temporary directories (``etc/`` stands for ``/etc/pnn-cluster``, ``home/``
for the home of the user ``pnn`` that runs Ray):

- the keys, made by the documented ``pnn-cluster keys`` steps;
- the optics device server: ``pnn-cluster serve-device`` with the arguments of ``serve-device-optics.env``
  (CURVE), bound to loopback instead of every interface;
- the electronics bench: ``pnn-cluster sim-instrument`` with ``sim-instrument-circuit.env``'s arguments (loopback);
- MLflow as ``mlflow-server.service`` runs it (basic auth, HTTPS with the certificate ``install-secrets.sh`` made,
  its secret key and admin password from the env file that script wrote), with SQLite in place of PostgreSQL;
- a Ray head with token authentication (``ray get-auth-token --generate``), on ports of its own.

Then ``pnn-cluster submit`` sends ``pnn-cluster train lab_cluster.yaml`` as a Ray job with the MLflow credentials
from the user's secrets file, and the run must be in MLflow with its metrics. Each piece must refuse a client
without its credentials.
"""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def lab(tmp_path_factory, mlflow_template):
    """Every documented piece, up on loopback; yields their addresses and credentials, stops them after."""
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs mlflow[auth] (Flask-WTF)")
    if not (BIN / "ray").exists() or not shutil.which("openssl"):
        pytest.skip("needs the ray command line and openssl")
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
    try:
        # -- step 1: the cluster's token (on the machine the cluster is managed from)
        run_ok(["sh", "-c", "umask 077 && ray get-auth-token --generate"], env)
        token_file = home / ".ray" / "auth_token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600

        # -- step 2: MLflow's secrets and certificate, then the server as its unit runs it (the slowest to start)
        run_ok(["sh", str(DEPLOY / "mlflow/install-secrets.sh"), "localhost", "127.0.0.1"],
               {**env, "PNN_ETC": str(etc)})
        (home / ".pnn-cluster").mkdir()
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

        # -- the head, with token authentication and the environment cluster.yaml starts it with, declaring both
        # instruments (this one machine is the whole lab)
        dash = free_port()
        cluster = yaml.safe_load((DEPLOY / "ray/cluster.yaml").read_text())
        head_env = dict(env)
        for m in re.finditer(r"\b([A-Z_]+)=(\S+)", " ".join(cluster["head_start_ray_commands"])):
            head_env[m.group(1)] = _localize(m.group(2), etc, home)
        assert head_env["RAY_AUTH_MODE"] == "token"
        resources = json.dumps({"instrument:shg-bench": 1, "instrument:circuit-bench": 1})
        services.append(head := Service("ray head", [
            str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}", "--include-dashboard=true",
            f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--resources={resources}",
            f"--temp-dir={ray_temp}", "--disable-usage-stats",
            # the session's own test cluster may run beside it: no port of Ray's defaults is shared
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--ray-client-server-port={free_port()}"], head_env))

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

        zmq_endpoint = optics.wait_for(r"serving .* on (tcp://\S+) \(CURVE on\)", 120).group(1)
        source = bench.wait_for(r"source \(\w+\): (TCPIP::\S+)", 120).group(1)
        sink = bench.wait_for(r"sink \(\w+\): (TCPIP::\S+)", 120).group(1)
        head.wait_for(r"Ray runtime started", 180)
        mlflow.wait_for(r"Uvicorn running on https://", 180)
        secrets_env = env_file(etc / "mlflow/mlflow.env")
        yield {
            "base": base, "etc": etc, "home": home, "env": env, "dash": f"http://127.0.0.1:{dash}",
            "token": token_file.read_text().strip(), "mlflow": f"https://127.0.0.1:{mlflow_port}",
            "ca": home / ".pnn-cluster/mlflow.crt", "admin": secrets_env["MLFLOW_AUTH_ADMIN_PASSWORD"],
            "zmq": zmq_endpoint, "source": source, "sink": sink,
        }
    finally:
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


def test_a_secrets_file_others_may_read_is_refused_in_one_line(tmp_path, capsys):
    from pnn_cluster.cli import main

    password = secrets.token_hex(12)
    path = tmp_path / "secrets.env"
    path.write_text(f"MLFLOW_TRACKING_USERNAME=ada\nMLFLOW_TRACKING_PASSWORD={password}\n")
    submit = ["submit", "--address", "http://127.0.0.1:9", "--secrets", str(path), "--", "pnn-cluster", "train", "x"]
    for mode in (0o644, 0o640, 0o604, 0o660):
        path.chmod(mode)
        assert main(submit) == 2  # before any connection to the cluster
        err = capsys.readouterr().err
        assert f"mode {mode:04o}" in err and f"chmod 600 {path}" in err
        assert len(err.strip().splitlines()) == 1 and password not in err
    path.write_text(f"MLFLOW_TRACKING_USERNAME=ada\nMLFLOW_TRACKING_PASSWORD {password}\n")
    path.chmod(0o600)
    assert main(submit) == 2
    err = capsys.readouterr().err
    assert "line 2: not KEY=VALUE" in err and password not in err


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


def test_a_training_submitted_with_the_secrets_file_is_recorded_in_mlflow(lab):
    env, home = lab["env"], lab["home"]
    # the admin makes an account; its owner keeps the credentials in a file only they can read
    password = secrets.token_hex(12)
    status, _ = _https(f"{lab['mlflow']}/api/2.0/mlflow/users/create", lab["ca"], "admin", lab["admin"],
                       data={"username": "ada", "password": password})
    assert status == 200
    secrets_file = home / ".config/pnn-cluster/secrets.env"
    secrets_file.parent.mkdir(parents=True)
    secrets_file.write_text(f"MLFLOW_TRACKING_USERNAME=ada\nMLFLOW_TRACKING_PASSWORD={password}\n")
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
    submit = [PNN, "submit", "--address", lab["dash"], "--runtime-env", str(runtime_env_file), "--", *train]
    secrets_file.chmod(0o600)

    deadline = time.monotonic() + 60
    while True:  # the head's job agent registers a little after "Ray runtime started"
        job = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in job.stdout + job.stderr or time.monotonic() > deadline:
            break
    out = job.stdout + job.stderr
    assert job.returncode == 0, out[-6000:]
    assert password not in out
    assert "credentials in its environment: MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_USERNAME" in out
    result = json.loads(next(line for line in reversed(out.splitlines()) if line.startswith('{"config"')))
    assert result["state"] == "finished" and result["device_actors"] == 2 and result["trainer_actor"] is True
    assert result["tracking_unsent"] == 0

    # the run, with its metrics, as its owner sees it; nobody without credentials sees it
    url = f"{lab['mlflow']}/api/2.0/mlflow/runs/get?run_id={result['run_id']}"
    status, body = _https(url, lab["ca"], "ada", password)
    assert status == 200
    run = body["run"]
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert {"test_acc", "val_acc"} <= set(metrics) and metrics["test_acc"] == pytest.approx(result["test_acc"])
    assert _https(url, lab["ca"])[0] == 401


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


def test_submit_adds_the_secrets_to_the_runtime_environment(tmp_path):
    from pnn_cluster.commands.submit import job_runtime_env, read_secrets

    path = tmp_path / "secrets.env"
    path.write_text("# mine\nMLFLOW_TRACKING_USERNAME=ada\nexport MLFLOW_TRACKING_PASSWORD='p w=1'\n\n"
                    "TQDM_MININTERVAL=1\n")
    path.chmod(0o600)
    found = read_secrets(path)
    assert found == {"MLFLOW_TRACKING_USERNAME": "ada", "MLFLOW_TRACKING_PASSWORD": "p w=1", "TQDM_MININTERVAL": "1"}
    env = job_runtime_env(DEPLOY / "ray/runtime-env.yaml", found, ".")
    shipped = yaml.safe_load((DEPLOY / "ray/runtime-env.yaml").read_text())
    assert env["pip"] == shipped["pip"] and env["working_dir"] == "."
    assert env["env_vars"] == {**shipped["env_vars"], **found}  # the secrets file wins over the shared file


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
