"""deploy/: every file parses, and every pnn-cluster command and configuration it names exists and parses."""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pnn_cluster.cli import COMMANDS, build_parser
from pnn_cluster.config import load_config

ROOT = Path(__file__).resolve().parents[1]
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
    assert opt["--backend-store-uri"].startswith(("postgresql://", "mysql://", "sqlite:///"))
    assert opt["--artifacts-destination"]
    assert "MLFLOW_AUTH_CONFIG_PATH=" in cp["Service"]["Environment"]
    auth = configparser.ConfigParser()
    auth.read(DEPLOY / "mlflow/basic_auth.ini")
    assert auth["mlflow"]["authorization_function"] and auth["mlflow"]["database_uri"]
    assert "admin_password" not in auth["mlflow"], "passwords go in the service's credentials, not in the repo"


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
    return found


def _argv(command: str) -> list[str]:
    words = shlex.split(command.strip().rstrip(".,;:"), comments=False)
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
    placeholders = {"RUN_ID": "0123456789abcdef", "CONFIG": "pnn_cluster/configs/hybrid_mnist.yaml"}
    argv = [placeholders.get(a, a) for a in argv]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's way of refusing
        pytest.fail(f"{where}: `pnn-cluster {' '.join(argv)}` does not parse (exit {exc.code})")
    assert args.command == argv[0]


def test_every_named_configuration_exists_and_loads():
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
