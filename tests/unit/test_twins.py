import json

import numpy as np
import pytest
import torch

from pnn_cluster.devices import Imperfections, make_device
from pnn_cluster.training.workers import TwinWorker
from pnn_cluster.twins import (
    build_twin,
    calibrate,
    check_drift,
    collect,
    evaluate_twin,
    fit_twin,
    load_twin,
    read_twin_meta,
    save_twin,
)


@pytest.fixture(scope="module")
def shg_cal():
    # the calibration-constant gap alone: the part of the sim-reality gap a physics twin can learn
    dev = make_device("shg", n_in=8, n_out=8, imperfections=make_device("shg").imperfections.with_(unmodelled=0.0))
    return dev, calibrate(dev, kinds=("physics", "mlp"), groups=16, batch=64, progress=False,
                          fit_overrides={"mlp": {"epochs": 10}})


def test_collect_repeats_measure_the_noise_floor():
    dev = make_device("shg", n_in=8, n_out=8, imperfections=Imperfections(noise=0.02, shot=0.0, gap=0.0))
    s = collect(dev, groups=6, batch=64, repeats=3, progress=False)
    assert len(s) == 6 and s.y[0].shape == (3, 64, 8) and s.device_samples == 6 * 3 * 64
    # additive noise of 0.02 * output_scale: the floor is sigma^2 / var(y)
    sigma2 = (0.02 * dev.output_scale) ** 2
    var = np.concatenate([y.reshape(-1) for y in s.y]).var()
    assert s.noise_floor() == pytest.approx(sigma2 / var, rel=0.15)


def test_noise_free_device_has_zero_floor():
    dev = make_device("shg", n_in=8, n_out=8, imperfections=Imperfections.ideal())
    assert collect(dev, groups=3, batch=16, progress=False).noise_floor() == 0.0


def test_physics_twin_reaches_the_noise_floor_and_beats_the_ideal_model(shg_cal):
    _, cal = shg_cal
    r = cal.results["physics"]
    assert r.nmse_val <= 2.0 * cal.noise_floor
    assert cal.ideal_nmse > 3 * r.nmse_val
    assert cal.best_kind == "physics"


def test_save_load_round_trip_without_pickle(shg_cal, tmp_path):
    dev, cal = shg_cal
    twin = cal.twins["physics"]
    path = save_twin(twin, tmp_path / "twins" / "shg", system="shg", fit=cal.results["physics"].as_dict())
    meta = read_twin_meta(path)
    assert meta["kind"] == "physics" and meta["system"] == "shg"
    json.dumps(meta)  # metadata is plain JSON
    loaded = load_twin(path, model=dev.model(), spec=dev.spec)
    assert evaluate_twin(loaded, cal.val) == pytest.approx(evaluate_twin(twin, cal.val), rel=1e-6)
    mlp = load_twin(save_twin(cal.twins["mlp"], tmp_path / "mlp"), spec=dev.spec)
    x = torch.rand(4, 8)
    p = {"phase": torch.zeros(dev.spec.param("phase").shape)}
    torch.testing.assert_close(mlp(x, p), cal.twins["mlp"](x, p))


def test_loading_for_another_device_layout_is_refused(shg_cal, tmp_path):
    dev, cal = shg_cal
    path = save_twin(cal.twins["physics"], tmp_path / "shg")
    other = make_device("shg", n_in=12, n_out=12)
    with pytest.raises(ValueError, match="different layout"):
        load_twin(path, model=other.model(), spec=other.spec)


def _output(twin, dev):
    x = torch.linspace(0, 1, 4 * 8).reshape(4, 8)
    return twin(x, {"phase": torch.full(dev.spec.param("phase").shape, 0.3)})


def test_a_saved_twin_is_one_file_written_in_one_atomic_step(shg_cal, tmp_path, monkeypatch):
    import pnn_cluster.twins.store as store

    dev, cal = shg_cal
    old, new = cal.twins["physics"], cal.twins["mlp"]
    path = save_twin(old, tmp_path / "shg")
    # the .json beside it is a readable copy: the twin loads from the .pt alone
    (tmp_path / "shg.json").unlink()
    torch.testing.assert_close(_output(load_twin(path, model=dev.model(), spec=dev.spec), dev), _output(old, dev))

    # a crash while the new twin's file is written: the old twin is still there, whole, and no temporary file
    def crash_mid_write(obj, f, *a, **kw):
        f.write(b"PK half a twin")
        raise OSError("power cut")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="power cut"):
        save_twin(new, tmp_path / "shg")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shg.pt"]
    assert read_twin_meta(path)["kind"] == "physics"

    # a crash after the twin's file was replaced, before its readable copy: the new twin is whole, its
    # metadata read from its own file, not from the stale copy
    save_twin(old, tmp_path / "shg")

    def crash(*a, **kw):
        raise OSError("power cut")

    monkeypatch.setattr(store, "atomic_write_text", crash)
    with pytest.raises(OSError):
        save_twin(new, tmp_path / "shg")
    monkeypatch.undo()
    assert json.loads((tmp_path / "shg.json").read_text())["kind"] == "physics"  # the stale copy
    assert read_twin_meta(path)["kind"] == "mlp"
    torch.testing.assert_close(_output(load_twin(path, spec=dev.spec), dev), _output(new, dev))


def test_twins_saved_in_format_1_still_load(shg_cal, tmp_path):
    dev, cal = shg_cal
    twin = cal.twins["physics"]
    # format 1: the state_dict alone in NAME.pt, the metadata in NAME.json
    torch.save(twin.state_dict(), tmp_path / "old.pt")
    (tmp_path / "old.json").write_text(json.dumps({"format_version": 1, "kind": twin.kind, "config": twin.config(),
                                                   "spec": twin.spec.to_dict(), "system": "shg"}))
    assert read_twin_meta(tmp_path / "old")["system"] == "shg"
    loaded = load_twin(tmp_path / "old.pt", model=dev.model(), spec=dev.spec)
    torch.testing.assert_close(_output(loaded, dev), _output(twin, dev))
    (tmp_path / "old.json").unlink()
    with pytest.raises(ValueError, match=r"old\.pt: a twin of format 1 keeps its metadata in old\.json"):
        load_twin(tmp_path / "old.pt", model=dev.model())


def test_a_file_that_is_not_a_twin_is_refused_naming_it(tmp_path):
    from pnn_cluster.twins.store import TwinFileError

    (tmp_path / "x.pt").write_text("hello")
    with pytest.raises(TwinFileError, match=r"x\.pt: not a saved twin"):
        load_twin(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match=r"nothing\.pt: no such twin file"):
        load_twin(tmp_path / "nothing")


def test_physics_kinds_need_a_model():
    dev = make_device("shg", n_in=8, n_out=8)
    with pytest.raises(ValueError, match="needs a physics model"):
        build_twin("physics", dev.spec, None)
    with pytest.raises(ValueError, match="unknown twin kind"):
        build_twin("gp", dev.spec, None)


def test_drift_is_detected_and_a_refinement_of_the_calibration_recovers():
    imp = Imperfections(noise=0.01, shot=0.0, gap=1.0, drift=0.0, seed=3)
    dev = make_device("shg", n_in=8, n_out=8, imperfections=imp)
    cal = calibrate(dev, kinds=("physics",), groups=12, batch=64, progress=False)
    twin, ref = cal.best, cal.results["physics"].nmse_val
    assert not check_drift(dev, twin, ref).drifted
    # the lab warms up: the device's constants wander far from where the twin was fitted
    dev.imperfections = imp.with_(drift=2.5)
    collect(dev, groups=1, batch=20_000, repeats=1, progress=False)
    dev.imperfections = imp.with_(drift=0.0)
    report = check_drift(dev, twin, ref)
    assert report.drifted, report.as_dict()
    # a refinement of what drifts (the calibration constants), as the recalibration watch makes one
    worker = TwinWorker.from_twin(twin)
    train, val = collect(dev, groups=12, batch=64, repeats=2, seed=5, progress=False).split(0.25, seed=5)
    refit = worker.refine(train, val, epochs=30)
    assert refit["figures"]["nmse_val"] < refit["nmse_before"]
    twin.load_state_dict(refit["payload"]["state"])
    assert not check_drift(dev, twin, ref, seed=7).drifted


@pytest.fixture(scope="module")
def realistic_shg():
    """SHG with its unmodelled physics on (pixel crosstalk, spectrometer leakage): what a physics twin lacks."""
    dev = make_device("shg", n_in=8, n_out=8)
    samples = collect(dev, groups=240, batch=16, repeats=2, progress=False)
    train, val = samples.split(0.2, seed=0)
    fit_on, stop = train.split(0.15, seed=1)
    return dev, fit_on, stop, val


def test_residual_twin_closes_what_the_physics_twin_cannot(realistic_shg):
    dev, fit_on, stop, val = realistic_shg
    floor = val.noise_floor()
    physics = fit_twin(build_twin("physics", dev.spec, dev.model()), fit_on, val, stop=stop, progress=False)
    residual_twin = build_twin("residual", dev.spec, dev.model())
    residual = fit_twin(residual_twin, fit_on, val, stop=stop, progress=False)
    assert physics.nmse_val > 2.5 * floor  # the model lacks physics no calibration constant reaches
    assert residual.nmse_val < 2.0 * floor
    assert residual.nmse_val < 0.5 * physics.nmse_val
    # physics constants, then the couplings around them, then everything together; each stage said and kept
    # only where it helped, so the fit ends at the last kept stage's state
    assert [st["stage"] for st in residual.stages] == ["physics", "residual", "joint"]
    assert residual.stages[1]["kept"]  # the couplings are what closes the gap
    last_kept = [st for st in residual.stages if st["kept"]][-1]
    assert residual.nmse_stop == pytest.approx(last_kept["nmse_stop"], rel=1e-6)
    assert evaluate_twin(residual_twin, stop) == pytest.approx(residual.nmse_stop, rel=1e-5)


def test_early_stopping_keeps_the_best_epoch_and_stops_when_it_no_longer_improves(realistic_shg):
    dev, fit_on, stop, val = realistic_shg
    twin = build_twin("mlp", dev.spec, hidden=(64,))
    res = fit_twin(twin, fit_on, val, stop=stop, epochs=400, patience=3, progress=False)
    assert len(res.history) < 400  # stopped early
    assert res.best_epoch == len(res.history) - 3
    # the state kept is that of the best epoch: its NMSE on the stopping samples is what the fit reported
    assert evaluate_twin(twin, stop) == pytest.approx(res.nmse_stop, rel=1e-5)


def test_an_unfitted_residual_twin_is_its_physics_model():
    dev = make_device("circuit", n_in=6, n_out=6)
    twin = build_twin("residual", dev.spec, dev.model())
    x = torch.rand(5, 6)
    p = {"drive": torch.rand(6) * 2 - 1}
    with torch.no_grad():
        torch.testing.assert_close(twin(x, p), dev.model()(x, p))
