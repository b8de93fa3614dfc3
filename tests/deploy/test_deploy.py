"""deploy/: every file parses, and every pnn-cluster command and configuration it names exists and parses."""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

from pnn_cluster.cli import COMMANDS, build_parser
from pnn_cluster.config import load_config

DEPLOY = ROOT / "deploy"
TEXT_FILES = sorted(p for p in DEPLOY.rglob("*") if p.is_file())
UNITS = sorted(DEPLOY.rglob("*.service"))


def unit(path: Path) -> configparser.ConfigParser:
    # systemd unit files are INI with repeatable keys (Environment=, ExecStart=): keep the last, keep case
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",), comment_prefixes=("#", ";"))
    cp.optionxform = str
    cp.read_string(path.read_text(), source=str(path))
    return cp


def env_file(path: Path) -> dict[str, str]:
    """A systemd EnvironmentFile: KEY=VALUE lines, values optionally in single or double quotes."""
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
        assert m, f"{path}:{n}: not KEY=VALUE: {line!r}"
        value = m.group(2)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[m.group(1)] = value
    return out


def test_deploy_has_what_a_lab_needs():
    names = {p.relative_to(DEPLOY).as_posix() for p in TEXT_FILES}
    assert {"README.md", "ray/cluster.yaml", "kuberay/raycluster.yaml", "ray/runtime-env.yaml",
            "mlflow/mlflow-server.service", "mlflow/basic_auth.ini", "systemd/pnn-serve-device@.service",
            "systemd/pnn-sim-instrument@.service", "systemd/pnn-ray-node.service"} <= names
    assert "## Run it across your lab" in (DEPLOY / "README.md").read_text()


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.yaml")), ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def test_ray_cluster_has_token_auth_and_gpu_twin_workers():
    onprem = yaml.safe_load((DEPLOY / "ray/cluster.yaml").read_text())
    assert onprem["provider"]["type"] == "local" and onprem["provider"]["head_ip"]
    assert all("RAY_AUTH_MODE=token" in c for c in onprem["head_start_ray_commands"] if "ray start" in c)
    assert all("RAY_AUTH_MODE=token" in c for c in onprem["worker_start_ray_commands"] if "ray start" in c)
    assert any(dst.endswith(".ray/auth_token") for dst in onprem["file_mounts"])
    kube = yaml.safe_load((DEPLOY / "kuberay/raycluster.yaml").read_text())
    assert kube["kind"] == "RayCluster" and kube["spec"]["authOptions"]["mode"] == "token"
    gpu_groups = [g for g in kube["spec"]["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]
    assert gpu_groups and "twin" in gpu_groups[0]["groupName"]


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_systemd_units_parse(path):
    cp = unit(path)
    assert {"Unit", "Service", "Install"} <= set(cp.sections())
    exec_start = cp["Service"]["ExecStart"]
    assert exec_start.split()[0].startswith("/"), "systemd wants an absolute path to the program"
    assert cp["Install"]["WantedBy"]
    for env in [v for k, v in cp["Service"].items() if k == "EnvironmentFile"]:
        assert env.startswith("/etc/pnn-cluster/")


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.env")), ids=lambda p: p.name)
def test_env_files_parse(path):
    assert env_file(path)


def test_mlflow_server_has_a_database_an_artifact_store_and_basic_auth():
    cp = unit(DEPLOY / "mlflow/mlflow-server.service")
    cmd = shlex.split(cp["Service"]["ExecStart"])
    assert cmd[1:3] == ["server", "--app-name"] and cmd[3] == "basic-auth"
    opt = dict(zip(cmd[::1], cmd[1::1]))
    assert opt["--backend-store-uri"].startswith(("postgresql", "mysql", "sqlite:///"))
    assert opt["--artifacts-destination"]
    assert "MLFLOW_AUTH_CONFIG_PATH=" in (DEPLOY / "mlflow/mlflow-server.service").read_text()
    auth = configparser.ConfigParser()
    auth.read(DEPLOY / "mlflow/basic_auth.ini")
    assert auth["mlflow"]["authorization_function"] and auth["mlflow"]["database_uri"]
    assert "admin_password" not in auth["mlflow"], "passwords go in the service's credentials, not in the repo"


def _unit_lines(path: Path, key: str) -> list[str]:
    """Every value of a repeatable key (Environment=, LoadCredential=) in a unit's [Service] section."""
    return [line.partition("=")[2] for line in path.read_text().splitlines() if line.startswith(f"{key}=")]


def test_mlflow_serves_https_only_with_its_own_key_and_certificate():
    path = DEPLOY / "mlflow/mlflow-server.service"
    cmd = shlex.split(unit(path)["Service"]["ExecStart"])
    assert "--gunicorn-opts" not in cmd and "--waitress-opts" not in cmd, "mlflow server runs uvicorn here"
    uvicorn = shlex.split(cmd[cmd.index("--uvicorn-opts") + 1])
    uv = dict(zip(uvicorn[::2], uvicorn[1::2]))
    credentials = dict(c.split(":", 1) for c in _unit_lines(path, "LoadCredential"))
    # the key and certificate reach the server as systemd credentials (%d), from root-only files
    for flag, name in (("--ssl-keyfile", "tls.key"), ("--ssl-certfile", "tls.crt")):
        assert uv[flag] == f"%d/{name}", flag
        assert credentials[name].startswith("/etc/pnn-cluster/mlflow/")
    # every shipped client reaches MLflow by https
    for text_path in TEXT_FILES + sorted((ROOT / "pnn_cluster" / "configs").glob("*.yaml")):
        assert "http://mlflow" not in text_path.read_text(), f"{text_path}: MLflow is served over https only"


def test_mlflow_secret_key_is_made_at_install_into_a_root_only_env_file():
    path = DEPLOY / "mlflow/mlflow-server.service"
    env_files = _unit_lines(path, "EnvironmentFile")
    assert env_files == ["/etc/pnn-cluster/mlflow/mlflow.env"]
    script = (DEPLOY / "mlflow/install-secrets.sh").read_text()
    # the installer writes the key the basic-auth app needs to start, in the directory it makes root-only
    assert "add MLFLOW_FLASK_SERVER_SECRET_KEY" in script and "env=$dir/mlflow.env" in script
    assert "umask 077" in script and 'chmod 700 "$dir"' in script
    assert not re.search(r"^Environment=MLFLOW_FLASK_SERVER_SECRET_KEY", path.read_text(), flags=re.M)


def test_mlflow_database_passwords_come_from_the_root_only_env_file():
    from urllib.parse import urlsplit

    path = DEPLOY / "mlflow/mlflow-server.service"
    cmd = shlex.split(unit(path)["Service"]["ExecStart"])
    auth = configparser.ConfigParser()
    auth.read(DEPLOY / "mlflow/basic_auth.ini")
    for uri in (cmd[cmd.index("--backend-store-uri") + 1], auth["mlflow"]["database_uri"]):
        assert urlsplit(uri).password is None, f"{uri}: a password in a URI"
    # libpq takes it from PGPASSWORD, which the installer adds to the service's root-only environment file
    assert "add PGPASSWORD" in (DEPLOY / "mlflow/install-secrets.sh").read_text()
    assert _unit_lines(path, "EnvironmentFile") == ["/etc/pnn-cluster/mlflow/mlflow.env"]


def test_jobs_get_mlflow_credentials_from_a_secrets_file_not_from_shipped_files():
    env = yaml.safe_load((DEPLOY / "ray/runtime-env.yaml").read_text())["env_vars"]
    assert env["MLFLOW_TRACKING_URI"].startswith("https://")
    # each node's Ray names the MLflow certificate it holds; jobs' processes inherit it
    cert = "MLFLOW_TRACKING_SERVER_CERT_PATH="
    onprem = yaml.safe_load((DEPLOY / "ray/cluster.yaml").read_text())
    for command in onprem["head_start_ray_commands"] + onprem["worker_start_ray_commands"]:
        assert "ray start" not in command or cert in command, command
    assert any(e.startswith(cert) for e in _unit_lines(DEPLOY / "systemd/pnn-ray-node.service", "Environment"))
    kube = yaml.safe_load((DEPLOY / "kuberay/raycluster.yaml").read_text())["spec"]
    pods = [kube["headGroupSpec"]] + kube["workerGroupSpecs"]
    for pod in pods:
        for container in pod["template"]["spec"]["containers"]:
            assert "MLFLOW_TRACKING_SERVER_CERT_PATH" in {e["name"] for e in container["env"]}
    for path in TEXT_FILES + sorted((ROOT / "pnn_cluster" / "configs").glob("*.yaml")):
        text = path.read_text()
        # an env file line or a YAML key with a value
        assert not re.search(r"^\s*(export\s+)?MLFLOW_TRACKING_PASSWORD\s*[:=][ \t]*\S", text, flags=re.M), \
            f"{path}: a password in a file"
    # every job the README submits goes through `pnn-cluster submit`, which adds the secrets file
    readme = (DEPLOY / "README.md").read_text()
    assert "ray job submit" not in readme.replace("`ray job submit --runtime-env`", "")
    submits = [argv for _, argv in COMMAND_LINES if argv[0] == "submit" and len(argv) > 1]
    assert submits and all("--runtime-env" in argv for argv in submits)


def _command_lines() -> list[tuple[str, list[str]]]:
    """Every `pnn-cluster ...` invocation in deploy/ and in the shipped configs' comments, as argv."""
    found: list[tuple[str, list[str]]] = []
    sources = TEXT_FILES + sorted((ROOT / "pnn_cluster" / "configs").glob("*.yaml"))
    for path in sources:
        text = path.read_text()
        where = path.relative_to(ROOT).as_posix()
        if path.suffix == ".service":
            exec_start = unit(path)["Service"]["ExecStart"]
            if not any(Path(w).name == "pnn-cluster" for w in exec_start.split()):
                continue
            # the example EnvironmentFile next to the unit gives the arguments ($VAR expands to several words)
            examples = [env_file(e) for e in sorted(path.parent.glob("*.env"))]
            for var in re.findall(r"\$(\w+)", exec_start):
                values = [e[var] for e in examples if var in e]
                assert values, f"{where}: no example .env file sets {var}"
                exec_start = exec_start.replace(f"${var}", values[0])
            found.append((where, _argv(exec_start)))
            continue
        if path.suffix == ".md":  # in Markdown, only code names commands: fenced blocks and inline spans
            text = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
                             + re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)))
        # join shell continuations and YAML-comment continuations, then find each invocation
        joined = re.sub(r"\\\n[#\s]*", " ", text)
        for m in re.finditer(r"pnn-cluster ([a-z][a-z-]*(?: [^`\n|)]*)?)", joined):
            argv = _argv("pnn-cluster " + m.group(1))
            if argv:
                found.append((where, argv))
            # `pnn-cluster submit ... -- pnn-cluster train ...`: the job's own command is checked as well
            if argv[:1] == ["submit"] and "--" in argv and argv[argv.index("--") + 1:][:1] == ["pnn-cluster"]:
                found.append((where, argv[argv.index("--") + 2:]))
    return found


def _argv(command: str) -> list[str]:
    words = shlex.split(command.strip().rstrip(".,;:"), comments=True)  # a shell comment after the command
    start = next(i for i, w in enumerate(words) if Path(w).name == "pnn-cluster")
    return words[start + 1:]


COMMAND_LINES = _command_lines()


def test_deploy_names_pnn_cluster_commands():
    named = {argv[0] for _, argv in COMMAND_LINES if argv}
    assert {"train", "serve-device", "sim-instrument", "devices", "evaluate"} <= named


@pytest.mark.parametrize("where, argv", COMMAND_LINES, ids=[f"{w}:{' '.join(a[:2])}" for w, a in COMMAND_LINES])
def test_every_named_command_exists_and_parses(where, argv):
    assert argv[0] in COMMANDS, f"{where}: `pnn-cluster {argv[0]}` is not a command ({', '.join(COMMANDS)})"
    if len(argv) == 1:
        return  # the command named in prose (`pnn-cluster serve-device`), not a full invocation
    placeholders = {"RUN_ID": "0123456789abcdef", "CONFIG": "pnn_cluster/configs/hybrid_mnist.yaml",
                    "HEAD": "ray-head.lab.example"}
    argv = [placeholders.get(a, a) for a in argv]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's way of refusing
        pytest.fail(f"{where}: `pnn-cluster {' '.join(argv)}` does not parse (exit {exc.code})")
    assert args.command == argv[0]


@pytest.fixture
def node_home(tmp_path, monkeypatch):
    """The home directory of the user that runs Ray on a lab node: the cluster's key files in ~/.pnn-cluster/curve."""
    from pnn_cluster.commands.keys import create_key_pair

    curve = tmp_path / ".pnn-cluster" / "curve"
    curve.mkdir(parents=True)
    create_key_pair(curve, "cluster")
    create_key_pair(curve, "optics")
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_every_named_configuration_exists_and_loads(node_home):
    named = set()
    for path in TEXT_FILES + sorted((ROOT / "pnn_cluster" / "configs").glob("*.yaml")):
        named |= set(re.findall(r"pnn_cluster/configs/[\w.-]+\.yaml", path.read_text()))
    assert "pnn_cluster/configs/lab_cluster.yaml" in named
    for rel in sorted(named):
        assert (ROOT / rel).is_file(), f"{rel} is named in deploy/ but does not exist"
        load_config(ROOT / rel)


def test_units_run_the_commands_the_lab_needs():
    execs = {p.name: unit(p)["Service"]["ExecStart"] for p in UNITS}
    assert "pnn-cluster serve-device" in execs["pnn-serve-device@.service"]
    assert "pnn-cluster sim-instrument" in execs["pnn-sim-instrument@.service"]
    node = unit(DEPLOY / "systemd/pnn-ray-node.service")["Service"]
    assert "ray start" in node["ExecStart"] and "--resources" in node["ExecStart"]
    assert "RAY_AUTH_MODE=token" in node["Environment"] or "RAY_AUTH_MODE=token" in (
        DEPLOY / "systemd/pnn-ray-node.service").read_text()
    env = env_file(DEPLOY / "systemd/ray-node.env")
    import json

    assert all(k.startswith("instrument:") for k in json.loads(env["PNN_NODE_RESOURCES"]))


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


def test_every_remote_device_server_has_curve():
    servers = [(w, a) for w, a in COMMAND_LINES if a[0] == "serve-device" and len(a) > 1]
    assert any("--allow-remote" in a for _, a in servers)
    for where, argv in servers:
        assert "--insecure" not in argv, f"{where}: a shipped device server without CURVE"
        if "--allow-remote" in argv:
            assert _flag(argv, "--curve-secret") and _flag(argv, "--curve-allow"), f"{where}: no CURVE: {argv}"


def test_the_scpi_bench_listens_on_loopback_only():
    from pnn_cluster.servers import is_loopback_host

    benches = [(w, a) for w, a in COMMAND_LINES if a[0] == "sim-instrument" and len(a) > 1]
    assert benches
    for where, argv in benches:
        assert "--allow-remote" not in argv and "--insecure" not in argv, f"{where}: {argv}"
        assert is_loopback_host(_flag(argv, "--host") or "127.0.0.1"), f"{where}: {argv}"
    for path in TEXT_FILES + sorted((ROOT / "pnn_cluster" / "configs").glob("*.yaml")):
        for line in path.read_text().splitlines():
            assert not ("sim-instrument" in line and "0.0.0.0" in line), f"{path}: {line}"


def test_the_lab_configuration_reaches_its_devices_as_deployed():
    from pnn_cluster.servers import is_loopback_host

    lab = yaml.safe_load((ROOT / "pnn_cluster/configs/lab_cluster.yaml").read_text())
    zmq_devices = {n: d["driver"] for n, d in lab["devices"].items() if d["driver"]["kind"] == "zmq"}
    visa_devices = {n: d for n, d in lab["devices"].items() if d["driver"]["kind"] == "visa"}
    assert zmq_devices and visa_devices
    server_args = env_file(DEPLOY / "systemd/serve-device-optics.env")["PNN_SERVE_DEVICE_ARGS"].split()
    server_key = Path(_flag(server_args, "--curve-secret"))
    for name, drv in zmq_devices.items():
        host = drv["address"].split("://")[1].rsplit(":", 1)[0]
        if not is_loopback_host(host):
            curve = drv.get("curve") or {}
            assert curve.get("secret_key_file", "").endswith(".key_secret"), f"{name}: no CURVE key pair"
            # the server's public key is the one `pnn-cluster keys DIR optics` writes beside the server's key pair
            assert Path(curve["server_public_key_file"]).name == server_key.stem + ".key", name
    for name, dev in visa_devices.items():
        # a simulated bench answers on loopback: the device actor runs on the PC that declared the instrument
        assert dev["placement"]["instrument"], name
        for role in ("source", "sink"):
            host = dev["driver"][role]["resource"].split("::")[1]
            assert is_loopback_host(host), f"{name}.{role}: {host}"
    assert lab["tracking"]["uri"].startswith("https://")


def test_kuberay_pods_speak_tls_with_a_pair_their_init_container_makes_for_their_own_ip(tmp_path):
    """Every Ray container of the KubeRay cluster has Ray's TLS variables, and the init container's script, run
    here with openssl against a CA that make-tls.sh makes, gives a key only its owner reads and a certificate for
    the pod's IP that the CA verifies, and the jobs' MLflow credentials with mode 600."""
    import os
    import shutil
    import stat
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    spec = yaml.safe_load((DEPLOY / "kuberay/raycluster.yaml").read_text())["spec"]
    pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    scripts = set()
    for pod in pods:
        pod_spec = pod["template"]["spec"]
        assert pod_spec["securityContext"]["runAsUser"] == 1000
        (init,) = pod_spec["initContainers"]
        scripts.add(init["command"][-1])
        for container in pod_spec["containers"]:
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["RAY_USE_TLS"] == "1" and env["RAY_TLS_SERVER_KEY"] == "/home/ray/tls/ray.key", env
            assert env["RAY_TLS_CA_CERT"] == "/home/ray/tls/ca.crt"
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    (script,) = scripts

    ca, tls, mlflow, jobs, ca_dir = (tmp_path / d for d in ("ca", "tls", "mlflow", "jobs", "cadir"))
    for d in (ca, tls, mlflow, jobs):
        d.mkdir()
    made = subprocess.run(["sh", str(DEPLOY / "ray/make-tls.sh"), "kube-probe", "localhost"], capture_output=True,
                          text=True, env={**os.environ, "PNN_CA_DIR": str(ca_dir), "PNN_TLS_DIR": str(ca_dir / "tls")})
    assert made.returncode == 0, made.stderr
    shutil.copy(ca_dir / "ca.crt", ca / "ca.crt")
    shutil.copy(ca_dir / "ca.key", ca / "ca.key")
    (jobs / "credentials").write_text("[mlflow]\nmlflow_tracking_username = pnn-jobs\n")
    here = (script.replace("/home/ray/tls", str(tls)).replace("/ca/", f"{ca}/")
            .replace("/home/ray/.mlflow", str(mlflow)).replace("/jobs-mlflow", str(jobs)))
    run = subprocess.run(["/bin/sh", "-ec", here], capture_output=True, text=True,
                         env={**os.environ, "POD_IP": "10.1.2.3", "POD_NAME": "pnn-lab-head-0"})
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tls.iterdir()) == ["ca.crt", "ray.crt", "ray.key"]
    for private in (tls / "ray.key", mlflow / "credentials"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(tls / "ca.crt"), str(tls / "ray.crt")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    names = subprocess.run(["openssl", "x509", "-in", str(tls / "ray.crt"), "-noout", "-ext", "subjectAltName"],
                           capture_output=True, text=True).stdout
    assert "IP Address:10.1.2.3" in names and "IP Address:127.0.0.1" in names, names
