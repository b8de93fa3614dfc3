"""Chaos: the tracking server away (from the start, or killed mid-run), the trainer process killed mid-epoch,
and a server that refuses a user.

A training never waits on tracking for long and never loses what it measured:
everything goes to the run's local directory first, and reaches the server
when it is back (during the run, or by ``pnn-cluster sync``); a killed trainer
resumes from its local checkpoint at the exact step it reached. A server that
refuses a user (MLflow's basic-auth app, configured as ``deploy/mlflow`` ships
it) is a configuration error said in one line, and once the admin has granted
the permission with ``deploy/mlflow/grant-access.py`` each run is recorded once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port, wait_until, write_config

from .conftest import CLI, Proc, assert_no_traceback, train_result

mlflow = pytest.importorskip("mlflow")

TRAIN_SAMPLES, BATCH = 110, 10
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
STEPS_PER_EPOCH = -(-TRAIN_SAMPLES // BATCH)


def slow_config(epochs: int, latency_s: float = 0.03, **tracking) -> dict:
    """A small digits run through one simulated circuit that takes ``latency_s`` a call (a real instrument's
    pace, so that a test can act while it trains)."""
    return {
        "name": "chaos-tracking",
        "dataset": {"name": "digits", "train_subset": 120, "test_subset": 60},
        "devices": {"circuit": {
            "driver": {"kind": "simulated", "system": "circuit", "options": {"n_in": 8, "n_out": 8},
                       "imperfections": {"latency_call_s": latency_s, "latency_sample_s": 0}},
            "twin": {"kind": "ideal", "groups": 3, "batch": 16}}},
        "stack": [{"kind": "linear", "size": 8}, {"kind": "rescale"}, {"kind": "physical", "device": "circuit"},
                  {"kind": "linear", "size": 10}],
        "optimizer": {"lr": 0.05},
        "schedule": {"epochs": epochs, "batch_size": BATCH, "eval_batch": 60},
        "tracking": {"experiment": "chaos", "log_models": False, "flush_every_s": 0.2, "retry_every_s": 0.5,
                     "residual_batch": 0, **tracking},
    }


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc): an ``mlflow server``'s uvicorn workers."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class MlflowServer:
    """``mlflow server`` on loopback with a SQLite store that outlives the process (killed, then restarted);
    with ``auth``, MLflow's basic-auth app configured by the shipped ``deploy/mlflow/basic_auth.ini`` (its
    database in SQLite here), ``admin`` the admin account (password ``admin_password``)."""

    admin_password = "admin-password-for-tests"

    def __init__(self, root: Path, port: int | None = None, auth: bool = False) -> None:
        self.root, self.port, self.auth = root, port or free_port(), auth
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: Proc | None = None

    def start(self) -> MlflowServer:
        argv = [str(Path(CLI[0]).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
                "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        # no job runner (a dozen huey worker processes the tracking API does not need)
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        if self.auth:
            import configparser

            ini = configparser.ConfigParser()
            ini.read(DEPLOY / "mlflow/basic_auth.ini")
            ini["mlflow"]["database_uri"] = f"sqlite:///{self.root / 'auth.db'}"
            with open(self.root / "basic_auth.ini", "w") as f:
                ini.write(f)
            argv += ["--app-name", "basic-auth"]
            env.update(MLFLOW_AUTH_CONFIG_PATH=str(self.root / "basic_auth.ini"),
                       MLFLOW_FLASK_SERVER_SECRET_KEY="0" * 64, MLFLOW_AUTH_ADMIN_PASSWORD=self.admin_password)
        self.proc = Proc(argv, cwd=self.root, name="mlflow server", env=env)
        wait_until(self._healthy, 120, f"mlflow server on port {self.port}", interval=0.2)
        return self

    def _healthy(self) -> bool:
        if self.proc.popen.poll() is not None:
            pytest.fail(f"mlflow server exited {self.proc.popen.returncode}:\n{self.proc.stderr}")
        return self._healthy_quiet()

    def kill(self) -> None:
        """SIGKILL the server and its worker processes, as a crashed machine would; wait until the port is free."""
        workers = descendants(self.proc.pid)
        for pid in [self.proc.pid, *workers]:  # all at once: a worker left alone would go on answering
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.kill()  # reaps it, and its output readers end with the workers' copies of the pipes
        wait_until(lambda: not any(Path(f"/proc/{p}").exists() and _state(p) != "Z" for p in workers), 30,
                   "the server's workers to end")
        wait_until(lambda: not self._healthy_quiet(), 30, f"port {self.port} to close")

    def _healthy_quiet(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def client(self):
        return mlflow.MlflowClient(self.uri)


@pytest.fixture
def mlflow_server(tmp_path, mlflow_template):
    shutil.copyfile(mlflow_template, tmp_path / "server.db")  # the server's store, its tables made already
    servers: list[MlflowServer] = []

    def make(port: int | None = None, auth: bool = False) -> MlflowServer:
        s = MlflowServer(tmp_path, port, auth)
        servers.append(s)
        return s

    yield make
    for s in servers:
        if s.proc is not None and s.proc.popen.poll() is None:
            s.kill()


def run_train(tmp_path, config: dict, *args: str, env: dict[str, str] | None = None) -> Proc:
    path = write_config(tmp_path / "chaos.yaml", config)
    return Proc([*CLI, "train", str(path), "--in-process", "--no-progress", "--json", *args], cwd=tmp_path,
                name="pnn-cluster train", env=env)


def the_run(client, run_id: str):
    run = client.get_run(run_id)
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    artifacts = {f.path for f in client.list_artifacts(run_id, "checkpoints")}
    return run, steps, artifacts


def test_unreachable_from_the_start_finishes_kept_locally_then_sync_uploads_it(tmp_path, mlflow_server):
    port = free_port()  # nothing listens there: the server is down
    epochs = 2
    proc = run_train(tmp_path, slow_config(epochs, latency_s=0.0), "--tracking-uri", f"http://127.0.0.1:{port}")
    rc, result = train_result(proc, 300)
    assert rc == 0, proc.stderr
    assert_no_traceback(proc)
    assert result["steps"] == epochs * STEPS_PER_EPOCH and result["state"] == "finished"
    assert result["tracking_wait_s"] <= 30.0  # the bound; it is a few hundredths of a second here
    assert result["tracking_unsent"] > 0 and result["run_id"].startswith("local-")
    warnings = [l for l in proc.lines("stderr") if l.startswith("pnn-cluster: tracking server")
                and "unreachable (" in l]
    assert len(warnings) == 1, proc.stderr  # the outage is reported once
    run_dir = Path(result["run_dir"])
    assert (run_dir / "checkpoints" / "last.pt").is_file()

    server = mlflow_server(port).start()
    sync = Proc([*CLI, "sync", "--json"], cwd=tmp_path, name="pnn-cluster sync")
    assert sync.wait(120) == 0, sync.stderr
    (line,) = [l for l in sync.lines() if l.startswith("{")]
    (synced,) = json.loads(line)["runs"]
    assert synced["left"] == 0 and synced["sent"] == result["tracking_unsent"]
    run, steps, artifacts = the_run(server.client(), synced["run_id"])
    assert run.info.status == "FINISHED"
    assert sorted(steps) == list(range(1, epochs * STEPS_PER_EPOCH + 1))  # every step, once
    assert "checkpoints/last.pt" in artifacts
    assert run.data.metrics["test_acc"] == pytest.approx(result["test_acc"])
    assert run.data.params["schedule.epochs"] == str(epochs)
    # nothing is left: a second sync has nothing to do
    again = Proc([*CLI, "sync"], cwd=tmp_path, name="pnn-cluster sync")
    assert again.wait(60) == 0 and "nothing to upload" in again.stdout


def test_a_server_that_accepts_and_never_answers_costs_seconds_not_minutes(tmp_path):
    """A hung tracking server (it accepts connections and never answers): MLflow alone would wait 120 s a
    call, 7 times over; the run waits for it twice, 5 s each (creating the run, the last uploads)."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held, stop = [], threading.Event()

    def accept_and_hold():
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(listener.accept()[0])

    acceptor = threading.Thread(target=accept_and_hold, daemon=True)
    acceptor.start()
    try:
        epochs = 2
        proc = run_train(tmp_path, slow_config(epochs, latency_s=0.0),
                         "--tracking-uri", f"http://127.0.0.1:{listener.getsockname()[1]}")
        rc, result = train_result(proc, 300)
    finally:
        stop.set()
        acceptor.join(5)
        for c in held:
            c.close()
        listener.close()
    assert rc == 0, proc.stderr
    assert_no_traceback(proc)
    assert held  # it did try the server
    assert result["steps"] == epochs * STEPS_PER_EPOCH and result["tracking_unsent"] > 0
    assert result["tracking_wait_s"] <= 30.0
    assert (Path(result["run_dir"]) / "checkpoints" / "last.pt").is_file()


def test_tracking_server_killed_mid_run_and_restarted_loses_nothing(tmp_path, mlflow_server):
    server = mlflow_server().start()
    epochs = 3
    proc = run_train(tmp_path, slow_config(epochs), "--tracking-uri", server.uri)
    proc.wait_for_line(r"epoch 1: train loss", 240)
    server.kill()
    proc.wait_for_line(r"tracking server .* unreachable", 60, stream="stderr")
    # hold the training while the server restarts (a slow machine could otherwise finish first), then let it go
    proc.signal(signal.SIGSTOP)
    try:
        server.start()
    finally:
        proc.signal(signal.SIGCONT)
    rc, result = train_result(proc, 300)
    assert rc == 0, proc.stderr
    assert_no_traceback(proc)
    assert "is back" in proc.stderr
    assert result["steps"] == epochs * STEPS_PER_EPOCH and result["tracking_unsent"] == 0
    assert not result["run_id"].startswith("local-")
    run, steps, artifacts = the_run(server.client(), result["run_id"])
    assert run.info.status == "FINISHED"
    assert sorted(steps) == list(range(1, epochs * STEPS_PER_EPOCH + 1))  # the outage's steps too, once each
    assert "checkpoints/last.pt" in artifacts
    epochs_logged = [m.step for m in server.client().get_metric_history(result["run_id"], "val_acc")]
    assert epochs_logged == [STEPS_PER_EPOCH * (e + 1) for e in range(epochs)]


def test_trainer_killed_mid_epoch_resumes_at_its_checkpoint(tmp_path, mlflow_store):
    import torch

    epochs = 3
    uri = mlflow_store
    proc = run_train(tmp_path, slow_config(epochs), "--tracking-uri", uri)
    proc.wait_for_line(r"MLflow run \S+ \(new\)", 240)
    run_dir = Path(proc.wait_for_line(r"kept locally in (\S+)", 10).group(1))

    def in_second_epoch():
        # the journal says which steps were taken: kill once a step of epoch 2 is recorded, not at an epoch's end
        from pnn_cluster.tracking.rundir import RunDir

        steps = [s for s, _ in RunDir(run_dir).metric_history(RunDir(run_dir).run_id, ["train_loss"])["train_loss"]]
        return steps and STEPS_PER_EPOCH < max(steps) < 2 * STEPS_PER_EPOCH

    wait_until(in_second_epoch, 240, "a step of the second epoch", interval=0.01)
    proc.kill()  # SIGKILL: no handler runs, nothing is flushed on the way out
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == STEPS_PER_EPOCH  # the end of epoch 1, whole

    from pnn_cluster.tracking.rundir import RunDir

    run_id = RunDir(run_dir).run_id
    assert not run_id.startswith("local-")  # the server (a SQLite store here) created the run
    resumed = Proc([*CLI, "train", "--resume", run_id, "--in-process", "--no-progress", "--json",
                    "--tracking-uri", uri], cwd=tmp_path, name="pnn-cluster train --resume")
    rc, result = train_result(resumed, 300)
    assert rc == 0, resumed.stderr
    assert_no_traceback(resumed)
    assert "resuming at epoch 1, step 11" in resumed.stdout
    assert result["steps"] == epochs * STEPS_PER_EPOCH and result["epochs"] == epochs
    assert result["run_id"] == run_id and result["run_dir"] == str(run_dir)
    client = mlflow.MlflowClient(uri)
    run, steps, artifacts = the_run(client, run_id)
    assert run.info.status == "FINISHED" and run.data.tags["pnn.resumed"] == "1"
    assert set(steps) == set(range(1, epochs * STEPS_PER_EPOCH + 1))  # the killed epoch's steps were taken again
    assert "checkpoints/last.pt" in artifacts
    final = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert final["global_step"] == epochs * STEPS_PER_EPOCH


def test_a_user_the_server_refuses_is_told_in_one_line_and_once_granted_each_run_is_recorded_once(
        tmp_path, mlflow_server, monkeypatch):
    server = mlflow_server(auth=True).start()
    admin = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": server.admin_password}
    ada = {"MLFLOW_TRACKING_USERNAME": "ada", "MLFLOW_TRACKING_PASSWORD": "ada-password-0123"}
    bob = {"MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": "bob-password-4567"}

    def grant(*args: str, passwords: str = "") -> subprocess.CompletedProcess:
        """deploy/mlflow/grant-access.py as the admin runs it (new users' passwords on standard input)."""
        return subprocess.run([sys.executable, str(DEPLOY / "mlflow/grant-access.py"), "--tracking-uri", server.uri,
                               *args], input=passwords, capture_output=True, text=True, timeout=120,
                              env={**os.environ, **admin})

    # the admin makes two accounts and grants ada the lab's experiment; bob has an account and nothing else
    made = grant("--create", "--experiment", "chaos", "ada", passwords=ada["MLFLOW_TRACKING_PASSWORD"] + "\n")
    assert made.returncode == 0, made.stderr
    assert "ada: account created" in made.stdout and "ada: EDIT on experiment 'chaos'" in made.stdout
    made = grant("--create", "--experiment", "elsewhere", "bob", passwords=bob["MLFLOW_TRACKING_PASSWORD"] + "\n")
    assert made.returncode == 0, made.stderr

    # bob's training stops at once: a configuration error, one line, nothing measured, nothing left behind
    config = slow_config(1, latency_s=0.0)
    refused = run_train(tmp_path, config, "--tracking-uri", server.uri, env=bob)
    assert refused.wait(120) == 2
    assert_no_traceback(refused)
    (line,) = [l for l in refused.lines("stderr") if "pnn-cluster" in l]
    assert line == (f"pnn-cluster train: error: tracking server {server.uri}: refused user 'bob' (403: permission "
                    "denied): EDIT on experiment 'chaos' is needed; an MLflow admin grants it with "
                    "deploy/mlflow/grant-access.py (deploy/README.md, step 2)")
    assert "epoch 1" not in refused.stdout and not list((tmp_path / "pnn-runs").iterdir())

    # bob trained while the server was away: `sync` is refused in one line (exit 2), then granted, uploads once
    proc = run_train(tmp_path, config, "--tracking-uri", f"http://127.0.0.1:{free_port()}", env=bob)
    rc, result = train_result(proc, 300)
    assert rc == 0 and result["tracking_unsent"] > 0, proc.stderr
    sync = subprocess.run([*CLI, "sync", "--tracking-uri", server.uri], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **bob})
    assert sync.returncode == 2, sync.stdout + sync.stderr
    assert len([l for l in sync.stderr.splitlines() if "refused user 'bob' (403" in l]) == 1
    assert "Traceback" not in sync.stderr and "refused this user" in sync.stdout
    granted = grant("--experiment", "chaos", "bob")
    assert granted.returncode == 0 and "bob: EDIT on experiment 'chaos'" in granted.stdout, granted.stderr
    sync = subprocess.run([*CLI, "sync", "--tracking-uri", server.uri, "--json"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **bob})
    assert sync.returncode == 0, sync.stdout + sync.stderr
    (synced,) = json.loads(sync.stdout.strip().splitlines()[-1])["runs"]

    # ada's training, recorded as it runs
    proc = run_train(tmp_path, config, "--tracking-uri", server.uri, env=ada)
    rc, mine = train_result(proc, 300)
    assert rc == 0 and mine["tracking_unsent"] == 0, proc.stderr
    assert_no_traceback(proc)

    for k, v in admin.items():  # this test's own reads, as the admin
        monkeypatch.setenv(k, v)
    client = server.client()
    runs = client.search_runs([client.get_experiment_by_name("chaos").experiment_id],
                              filter_string="tags.`pnn.command` = 'train'")
    assert sorted(r.info.run_id for r in runs) == sorted([synced["run_id"], mine["run_id"]])  # once each
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert run.info.status == "FINISHED" and sorted(steps) == list(range(1, STEPS_PER_EPOCH + 1))
