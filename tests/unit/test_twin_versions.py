"""Twin versions of a training run: recorded in its run directory and on the server, listed by `pnn-cluster twins`,
drawn over the training's steps. Against an in-memory stand-in for the tracking server: no store to create."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("mlflow")
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST  # noqa: E402

from pnn_cluster import tracking  # noqa: E402
from pnn_cluster.cli import main  # noqa: E402
from pnn_cluster.fsio import torch_load_tensors  # noqa: E402
from pnn_cluster.tracking import MlflowCallback, TwinFit, twin_history_figure  # noqa: E402


class FakeServer:
    """What a tracking server keeps of a run (tags, metrics, artifacts as uploaded), in memory."""

    def __init__(self):
        self.runs: dict[str, dict] = {}

    def _run(self, run_id):
        if run_id not in self.runs:
            raise MlflowException(f"Run '{run_id}' not found", error_code=RESOURCE_DOES_NOT_EXIST)
        return self.runs[run_id]

    def get_experiment_by_name(self, name):
        return SimpleNamespace(experiment_id="1")

    def create_run(self, experiment_id, start_time=None, run_name=None, tags=None):
        run_id = f"run{len(self.runs)}"
        self.runs[run_id] = {"tags": dict(tags or {}), "metrics": {}, "artifacts": {}, "status": "RUNNING"}
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id))

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        run = self._run(run_id)
        for m in metrics:
            run["metrics"].setdefault(m.key, {})[m.step] = m.value
        run["tags"].update({t.key: t.value for t in tags})

    def log_artifact(self, run_id, local_path, artifact_path=None):
        name = Path(local_path).name
        self._run(run_id)["artifacts"][f"{artifact_path}/{name}" if artifact_path else name] = \
            Path(local_path).read_bytes()

    def set_terminated(self, run_id, status, end_time=None):
        self._run(run_id)["status"] = status

    def get_run(self, run_id):
        return SimpleNamespace(data=SimpleNamespace(tags=dict(self._run(run_id)["tags"])))

    def update_run(self, run_id, status=None):
        self._run(run_id)["status"] = status

    def set_tag(self, run_id, key, value):
        self._run(run_id)["tags"][key] = value

    def list_artifacts(self, run_id, path=None):
        return [SimpleNamespace(path=k) for k in self._run(run_id)["artifacts"] if k.startswith(f"{path}/")]

    def download_artifacts(self, run_id, path, dst_path):
        data = self._run(run_id)["artifacts"].get(path)
        if data is None:
            raise OSError(f"no artifact {path}")
        out = Path(dst_path) / path
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        return str(out)

    def get_metric_history(self, run_id, key):
        return [SimpleNamespace(step=s, value=v) for s, v in sorted(self._run(run_id)["metrics"].get(key, {}).items())]


@pytest.fixture
def server(monkeypatch):
    server = FakeServer()
    monkeypatch.setattr(tracking, "tracking_client", lambda uri: server)
    monkeypatch.delenv("PNN_RUNS_DIR", raising=False)
    return server


def tracker(**kw) -> MlflowCallback:
    return MlflowCallback("fake://server", experiment="tests", flush_every_s=3600, **kw)


def record(device="circuit/1", version=1, step=30, source="refine", accepted=True, ratio=1.6, parent=0):
    return {"device": device, "version": version, "step": step, "source": source, "kind": "physics",
            "nmse": ratio * 1e-3, "noise_floor": 1e-3, "ratio_to_floor": ratio,
            "samples": {"device_samples": 200, "buffer_rows": 640, "explore_rows": 64, "groups": 4},
            "parent": parent, "accepted": accepted, "seconds": 0.5, "state_hash": f"h{version}"}


def calibration_fit(device="circuit/1", ratio=1.2) -> TwinFit:
    torch.manual_seed(0)
    return TwinFit(device, torch.nn.Linear(3, 2), "physics", ratio * 1e-3, 1e-3, device_samples=500, seconds=1.5)


def versions_file(cb: MlflowCallback) -> list[dict]:
    return json.loads(cb.dir.file("twins/versions.json").read_text())


def test_each_version_is_journalled_with_its_tensors_and_the_one_file_holds_them_all(server):
    cb = tracker()
    with cb:
        fit = calibration_fit()
        cb.log_twin_fit(fit)
        refit = {k: v + 1 for k, v in fit.twin.state_dict().items()}
        cb.log_twin_version(record(version=1, step=30), refit)
        cb.log_twin_version(record(version=2, step=60, source="recalibration", accepted=False, ratio=1.9, parent=1))
        versions = versions_file(cb)
        assert [(v["version"], v["step"], v["source"], v["accepted"]) for v in versions] == \
            [(0, 0, "calibration", True), (1, 30, "refine", True), (2, 60, "recalibration", False)]
        assert versions == cb.twin_versions and {v["run_id"] for v in versions} == {cb.run_id}
        assert versions[0]["samples"] == {"device_samples": 500} and versions[0]["ratio_to_floor"] == \
            pytest.approx(1.2)
        # the tensors of each version given them, under the replica's name, written atomically (no leftovers)
        folder = cb.dir.file("twins/circuit_1")
        assert sorted(p.name for p in folder.iterdir()) == ["v0.pt", "v1.pt"]
        saved = torch_load_tensors(folder / "v1.pt")
        assert saved.keys() == refit.keys() and all(torch.equal(saved[k], refit[k]) for k in refit)
        assert versions[1]["state_file"] == "twins/circuit_1/v1.pt" and "state_file" not in versions[2]
        assert versions[0]["state_hash"] != tracking.twin_state_hash(refit)
        uploads = [(op["file"], op["artifact_path"]) for op in cb.dir.read_journal() if op["op"] == "log_artifact"]
        assert ("files/twins/versions.json", "twins") in uploads and ("files/twins/circuit_1/v1.pt",
                                                                      "twins/circuit_1") in uploads
        # the twin in use, step by step: a refit not kept is in the file only
        history = cb.dir.metric_history(cb.run_id, ["twin/circuit/1/version", "twin/circuit/1/ratio_to_floor"])
        assert history["twin/circuit/1/version"] == [(0, 0.0), (30, 1.0)]
        assert history["twin/circuit/1/ratio_to_floor"] == [(0, pytest.approx(1.2)), (30, 1.6)]
    run = server.runs[cb.run_id]
    assert run["tags"]["pnn.twin_version.circuit/1"] == "1"
    # uploaded, the latest file holds every version
    assert [v["version"] for v in json.loads(run["artifacts"]["twins/versions.json"])] == [0, 1, 2]
    assert "twins/circuit_1/v0.pt" in run["artifacts"] and "twins/circuit_1/v1.pt" in run["artifacts"]


def test_numbering_continues_when_the_run_is_resumed_here_or_on_another_machine(server, tmp_path):
    first = tracker()
    with first:
        first.log_twin_fit(calibration_fit())
        first.log_twin_fit(calibration_fit("optics"))
    # the same machine: the run directory's file
    with tracker(run_dir=first.run_dir) as again:
        assert [(v["device"], v["version"]) for v in again.twin_versions] == [("circuit/1", 0), ("optics", 0)]
        assert again.next_twin_version("circuit/1") == 1 and again.next_twin_version("circuit/2") == 0
        again.log_twin_version(record(version=again.next_twin_version("circuit/1"), step=40))
        assert [(v["device"], v["version"]) for v in versions_file(again)] == \
            [("circuit/1", 0), ("optics", 0), ("circuit/1", 1)]
    # another machine (no run directory of it): the server's file
    with tracker(run_id=first.run_id, runs_root=tmp_path / "elsewhere") as there:
        assert there.run_dir != first.run_dir
        assert there.next_twin_version("circuit/1") == 2
        there.log_twin_version(record(version=2, step=80, source="recalibration", parent=1))
        assert [v["version"] for v in versions_file(there)] == [0, 0, 1, 2]
    assert [v["version"] for v in json.loads(server.runs[first.run_id]["artifacts"]["twins/versions.json"])] == \
        [0, 0, 1, 2]


def test_the_drift_plot_marks_each_refit_and_the_calibration_ratio():
    history = {"drift/circuit/1/ratio": [(s, 1.2 + 0.02 * s) for s in range(0, 90, 10)],
               "drift/optics/ratio": [(s, 1.1) for s in range(0, 90, 10)]}
    versions = [record(version=0, step=0, source="calibration", ratio=1.2, parent=None), record(version=1, step=30),
                record(version=2, step=60, source="recalibration", accepted=False),
                record(device="optics", version=0, step=0, source="calibration", ratio=1.1, parent=None)]
    fig = twin_history_figure(history, versions, {"circuit/1": [(40, False), (70, True)], "optics": []})
    circuit, optics = fig.axes
    assert circuit.get_title(loc="left") == "circuit/1" and circuit.get_yscale() == "log"
    marks = {l.get_gid(): l.get_linestyle() for l in circuit.lines if (l.get_gid() or "").startswith("twin-")}
    assert marks == {"twin-version:circuit/1:v1": "-", "twin-version:circuit/1:v2": ":"}  # kept solid, not kept dotted
    # alarms on the curve: the one whose reference showed drift apart from the one where the device was as before
    alarms = {l.get_gid(): list(zip(l.get_xdata(), l.get_ydata())) for l in circuit.lines
              if (l.get_gid() or "").startswith("alarm:")}
    assert alarms == {"alarm:circuit/1:region": [(40, pytest.approx(2.0))],
                      "alarm:circuit/1:drift": [(70, pytest.approx(2.6))]}
    assert {t.get_text().strip() for t in circuit.texts} == {"v1 refine", "v2 recalibration"}
    levels = sorted(l.get_ydata()[0] for l in circuit.lines if not l.get_gid() and len(l.get_ydata()) > 1
                    and len(set(l.get_ydata())) == 1)
    assert levels == pytest.approx([1.2, 2.4])  # the calibration's ratio and twice it
    assert not [l for l in optics.lines if l.get_gid()]


def test_alarms_are_read_from_the_metrics_and_told_apart_by_the_region_count():
    from pnn_cluster.tracking.figures import alarm_steps

    alarm = [(10, 1.0), (25, 1.0), (40, 1.0)]
    region = [(5, 0.0), (10, 0.0), (25, 1.0), (40, 1.0)]  # a running count: it rose at step 25
    assert alarm_steps(alarm, region) == [(10, True), (25, False), (40, True)]
    assert alarm_steps(alarm, []) == [(10, True), (25, True), (40, True)]  # a run from before the reference check


def test_a_finished_training_draws_the_drift_plot_when_it_measured_drift(server):
    cb = tracker(log_models=False)
    trainer = SimpleNamespace(state="finished", global_step=90, device_samples=1000)
    with cb:
        cb.log_twin_fit(calibration_fit())
        for step in range(10, 100, 10):
            cb.on_step_end(SimpleNamespace(global_step=step), {"train_loss": 1.0, "drift/circuit/1/ratio": 1.2,
                                                               "drift/circuit/1/region_alarms": float(step > 40),
                                                               **({"drift/circuit/1/alarm": 1.0} if step in (40, 50)
                                                                  else {})})
        cb.log_twin_version(record(version=1, step=50))
        cb.on_train_end(trainer, {})
        assert cb.dir.file("plots/twin_drift.png").stat().st_size > 0
    # a training that measured no drift has no such plot
    with tracker(log_models=False) as quiet:
        quiet.log_twin_fit(calibration_fit())
        quiet.on_step_end(SimpleNamespace(global_step=1), {"train_loss": 1.0})
        quiet.on_train_end(trainer, {})
        assert not quiet.dir.file("plots/twin_drift.png").exists()


def test_twins_command_lists_a_run_directory_as_a_table_and_as_json(server, capsys):
    with tracker() as cb:
        cb.log_twin_fit(calibration_fit())
        cb.log_twin_version(record(version=1, step=30))
        cb.log_twin_version(record(version=2, step=60, source="recalibration", accepted=False, ratio=1.9))
    capsys.readouterr()
    assert main(["twins", str(cb.run_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["device", "version", "step", "source", "kind", "NMSE", "floor", "ratio", "device",
                              "samples", "accepted"]
    rows = [line.split() for line in out[3:]]
    assert [r[:4] for r in rows] == [["circuit/1", "0", "0", "calibration"], ["circuit/1", "1*", "30", "refine"],
                                     ["circuit/1", "2", "60", "recalibration"]]
    assert rows[0][5:9] == ["1.200e-03", "1.000e-03", "1.20", "500"] and rows[2][-1] == "no"
    # by run id, found among this machine's run directories
    assert main(["twins", cb.run_id, "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    got = json.loads(line)
    assert got["run_id"] == cb.run_id and got["active"] == {"circuit/1": 1}
    assert [v["version"] for v in got["versions"]] == [0, 1, 2]


def test_twins_command_reads_the_server_when_this_machine_has_no_run_directory(server, tmp_path, capsys):
    with tracker(runs_root=tmp_path / "elsewhere") as cb:
        cb.log_twin_fit(calibration_fit())
    capsys.readouterr()
    assert main(["twins", cb.run_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["active"] == {"circuit/1": 0}


@pytest.mark.parametrize("argv, said", [
    (["twins", "no-such-run"], "no-such-run: neither a run directory nor a run in tracking URI"),
    (["twins", "missing-dir/"], "not a run directory"),
])
def test_twins_of_what_is_no_run_is_a_one_line_usage_error(server, tmp_path, capsys, argv, said):
    (tmp_path / "missing-dir").mkdir()
    assert main(argv) == 2
    (err,) = capsys.readouterr().err.splitlines()
    assert err.startswith("pnn-cluster twins: error: ") and said in err


def test_twins_of_a_run_without_versions_or_an_unreachable_server(server, capsys):
    with tracker() as cb:
        pass  # a run that never fitted a twin
    assert main(["twins", str(cb.run_dir)]) == 2
    assert "has no twin versions" in capsys.readouterr().err
    assert main(["twins", "run-elsewhere"]) == 2
    capsys.readouterr()

    def down(run_id):
        raise MlflowException("API request failed with exception Connection refused")

    server.get_run = down
    assert main(["twins", "run-elsewhere"]) == 1
    (err,) = capsys.readouterr().err.splitlines()
    assert "unreachable (Connection refused)" in err
