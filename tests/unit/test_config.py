"""Experiment configurations: every kind of mistake names the file and the key; shipped examples load."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest
import yaml
from helpers import tiny_config

from pnn_cluster.cli import main
from pnn_cluster.config import (
    ConfigError,
    example_config_path,
    example_configs,
    flatten,
    load_config,
    parse_config,
)
from pnn_cluster.runner.build import build_stack, device_recipes, load_data, train_config

TINY = tiny_config()


def write(tmp_path: Path, data, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return p


def mistake(tmp_path: Path, change) -> ConfigError:
    data = copy.deepcopy(TINY)
    change(data)
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message  # every line names the file first
    return info.value


@pytest.mark.parametrize("change, key, words", [
    (lambda d: d["schedule"].update(epochz=3), "schedule.epochz", ["unknown key", "did you mean 'epochs'",
                                                                   "allowed: epochs, batch_size"]),
    (lambda d: d.update(optimiser={"lr": 1}), "optimiser", ["unknown key", "allowed:", "optimizer"]),
    (lambda d: d["schedule"].update(epochs="three"), "schedule.epochs", ["wrong type", "'three'", "an integer"]),
    (lambda d: d["devices"]["circuit"].update(driver=[1, 2]), "devices.circuit.driver", ["simulated, visa, zmq"]),
    (lambda d: d["schedule"].update(batch_size=0), "schedule.batch_size", ["out of range: 0", "allowed: >= 1"]),
    (lambda d: d.update(optimizer={"lr": -0.1}), "optimizer.lr", ["out of range: -0.1", "allowed: > 0"]),
    (lambda d: d["devices"]["circuit"]["twin"].update(groups=2), "devices.circuit.twin.groups", [">= 3"]),
    (lambda d: d["devices"]["circuit"]["driver"].update(system="circuitt"), "devices.circuit.driver.system",
     ["unknown system 'circuitt'", "did you mean 'circuit'", "allowed: circuit, oscillators, plate, shg"]),
    (lambda d: d["devices"]["circuit"]["driver"].update(kind="usb"), "devices.circuit.driver.kind",
     ["unknown kind 'usb'", "allowed: simulated, visa, zmq"]),
    (lambda d: d["devices"]["circuit"]["driver"]["options"].update(n_inputs=8),
     "devices.circuit.driver.options.n_inputs", ["unknown option", "allowed: n_in, n_out, n_params"]),
    (lambda d: d["dataset"].update(name="cifar10"), "dataset.name", ["'cifar10'", "mnist5k, digits, vowels, npz, idx"]),
    (lambda d: d["dataset"].update(val_fraction=0.6), "dataset.val_fraction", ["out of range: 0.6", "<= 0.5"]),
    (lambda d: d["dataset"].update(val_fraction=-0.1), "dataset.val_fraction", ["out of range: -0.1", ">= 0"]),
    (lambda d: d["dataset"].update(name="idx", path="no-mnist-here"), "dataset.path",
     ["no such directory", "no-mnist-here", "the directory holding the IDX files"]),
    (lambda d: d["dataset"].update(name="npz", path="missing.npz"), "dataset.path", ["no such file", "missing.npz"]),
    (lambda d: d["devices"]["circuit"]["twin"].update(load="twins/nothing"), "devices.circuit.twin.load",
     ["no such file", "nothing.pt"]),
    (lambda d: d.pop("dataset"), "dataset", ["missing required key"]),
    (lambda d: d["stack"][2].update(device="circiut"), "stack.2.device", ["unknown device 'circiut'",
                                                                          "allowed: circuit"]),
    (lambda d: d["stack"][0].pop("size"), "stack.0.size", ["linear layer needs its output size"]),
    (lambda d: d["stack"][1].update(kind="conv"), "stack.1.kind", ["'conv'", "linear, rescale, physical, affine"]),
    (lambda d: d["devices"]["circuit"].update(driver={"kind": "zmq", "address": "labpc:5555"}),
     "devices.circuit.driver.address", ["not a ZeroMQ endpoint", "tcp://HOST:PORT"]),
    (lambda d: d["devices"]["circuit"].update(driver={"kind": "visa", "source": {"driver": "awg", "resource": "A"},
                                                      "sink": {"driver": "oscilloscope", "resource": "B"}}),
     "devices.circuit.driver.sink.driver", ["unknown instrument driver", "allowed: awg, pulse_shaper, scope"]),
    (lambda d: d["devices"]["circuit"].update(placement={"instrument": "bad name!"}),
     "devices.circuit.placement.instrument", ["'bad name!'"]),
    (lambda d: d["devices"]["circuit"].update(placement={"twin_gpus": 1}), "devices.circuit.placement.twin_gpus",
     ["unknown key", "allowed: instrument, labels, resources, twins"]),
    (lambda d: d["devices"]["circuit"].update(driver={"kind": "python", "class": "mylab.devices.Amp"}),
     "devices.circuit.driver.class", ["not a class path: 'mylab.devices.Amp'", "allowed: package.module:ClassName"]),
    (lambda d: d["devices"]["circuit"].update(driver={"kind": "python", "class": "mylab:Amp",
                                                      "imperfections": {"noise": 0.1}}),
     "devices.circuit.driver.imperfections", ["unknown key", "allowed: kind, class, options, model"]),
    (lambda d: d["devices"]["circuit"].update(pool=[{"driver": {"kind": "zmq", "address": "tcp://labpc:5555"}}]),
     "devices.circuit.pool.0.driver.kind", ["a pool holds devices of one kind", "'circuit' is simulated",
                                            "allowed: simulated"]),
    (lambda d: d["devices"]["circuit"].update(replicas=0), "devices.circuit.replicas", ["out of range: 0", ">= 1"]),
    (lambda d: d["devices"]["circuit"]["driver"].update(imperfections={"unmodelled": -1}),
     "devices.circuit.driver.imperfections.unmodelled", ["out of range: -1", ">= 0"]),
    (lambda d: d.update(method="digitl"), "method", ["'digitl'", "pat, in_silico, oracle, ablation, digital"]),
    (lambda d: d["devices"]["circuit"]["twin"].update(kind="gp"), "devices.circuit.twin.kind",
     ["'gp'", "physics, residual, mlp, structured, ideal, best"]),
    # every number is bounded: the message gives both ends of the range
    (lambda d: d.update(seed=2**70), "seed",
     ["out of range: 1180591620717411303424", "allowed: >= 0 and <= 4294967295"]),
    (lambda d: d["dataset"].update(split_seed=2**32), "dataset.split_seed", ["<= 4294967295"]),
    (lambda d: d["devices"]["circuit"]["driver"].update(seed=-1), "devices.circuit.driver.seed", [">= 0 and <="]),
    (lambda d: d["schedule"].update(batch_size=10**7), "schedule.batch_size", ["allowed: >= 1 and <= 1000000"]),
    (lambda d: d["schedule"].update(micro_batch=0), "schedule.micro_batch", ["out of range: 0", ">= 1 and <= 1000000"]),
    (lambda d: d["stack"][0].update(size=10**6), "stack.0.size", ["out of range: 1000000", "<= 65536"]),
    (lambda d: d["devices"]["circuit"]["twin"].update(kind="mlp", hidden=[16, 0]), "devices.circuit.twin.hidden.1",
     ["out of range: 0", "allowed: >= 1 and <= 65536"]),
    (lambda d: d["devices"]["circuit"]["twin"].update(kind="mlp", hidden=[8] * 40), "devices.circuit.twin.hidden",
     ["too long: 40 items", "at most 32"]),
    (lambda d: d.update(optimizer={"lr": float("nan")}), "optimizer.lr", ["not a finite number: nan", "> 0 and <= 10"]),
    (lambda d: d["devices"]["circuit"]["driver"].update(imperfections={"noise": float("inf")}),
     "devices.circuit.driver.imperfections.noise", ["not a finite number: inf"]),
    (lambda d: d["devices"]["circuit"].update(placement={"resources": {"gpu_slot": float("inf")}}),
     "devices.circuit.placement.resources.gpu_slot", ["not a finite number: inf", "> 0 and <= 1e+12"]),
    # a simulated system's options: names, integer sizes and ranges, before anything is allocated
    (lambda d: d["devices"]["circuit"]["driver"]["options"].update(n_in=1e11), "devices.circuit.driver.options.n_in",
     ["out of range: 1e+11", "allowed: an integer from 1 to 65536"]),
    (lambda d: d["devices"]["circuit"]["driver"]["options"].update(n_in="1e11"), "devices.circuit.driver.options.n_in",
     ["not an integer (str): '1e11'", "allowed: an integer from 1 to 65536"]),
    (lambda d: d["devices"]["circuit"]["driver"]["options"].update(n_out=8.0), "devices.circuit.driver.options.n_out",
     ["not an integer (float): 8.0"]),
    (lambda d: d["devices"]["circuit"]["driver"]["options"].update(n_params=0),
     "devices.circuit.driver.options.n_params", ["out of range: 0", "from 1 to 65536"]),
    (lambda d: d["devices"]["circuit"].update(driver={"kind": "zmq", "address": "tcp://labpc:5555",
                                                      "model": {"system": "circuit", "options": {"n_in": 10**9}}}),
     "devices.circuit.driver.model.options.n_in", ["out of range: 1000000000"]),
    (lambda d: d["devices"]["circuit"].update(driver={"kind": "zmq", "address": "tcp://labpc:5555", "spec": {
        "name": "amp", "input": {"size": 1e11, "low": 0, "high": 1}, "output": {"size": 8}}}),
     "devices.circuit.driver.spec.input.size", ["out of range", "an integer from 1 to 65536"]),
    (lambda d: d["devices"]["circuit"].update(driver={"kind": "zmq", "address": "tcp://labpc:5555",
                                                      "spec": {"name": "amp"}}),
     "devices.circuit.driver.spec", ["not a device spec: missing key 'input'"]),
])
def test_each_mistake_names_file_and_key(tmp_path, change, key, words):
    err = mistake(tmp_path, change)
    assert key in err.keys, (key, str(err))
    line = next(line for line in str(err).splitlines() if f": {key}: " in line)
    for w in words:
        assert w in line, (w, line)


def test_sizes_whose_memory_exceeds_the_machine_are_refused_naming_the_key(tmp_path, monkeypatch):
    import pnn_cluster.config as config

    monkeypatch.setattr(config, "machine_memory", lambda: 2**30)  # a machine of 1 GiB
    # digits (64 features) -> linear 8 -> rescale 8 -> circuit (8 -> 8) -> linear 10: 98 values a sample,
    # kept three times (values, gradients, the twins' products) in float64: 2352 bytes a sample
    err = mistake(tmp_path, lambda d: d["schedule"].update(batch_size=1_000_000))
    assert err.keys == ["schedule.batch_size"]
    line = str(err)
    assert "a batch of 1000000 samples through layers 64+8+8+8+10 wide needs about 2.19 GiB" in line
    assert "more than this machine's memory (1 GiB) (allowed: at most 456522 samples at these sizes)" in line
    ok = copy.deepcopy(TINY)
    ok["schedule"]["batch_size"] = 456522
    parse_config(ok)  # the largest batch the message allows is allowed
    ok["schedule"]["batch_size"] = 456523
    with pytest.raises(ConfigError, match="schedule.batch_size"):
        parse_config(ok)
    err = mistake(tmp_path, lambda d: d["devices"]["circuit"]["twin"].update(groups=100_000, batch=100_000))
    assert err.keys == ["devices.circuit.twin.batch"]
    assert "100000 groups x 100000 calibration samples x 2 repeats needs about" in str(err)
    err = mistake(tmp_path, lambda d: d["devices"]["circuit"]["twin"].update(kind="mlp", hidden=[65536, 65536]))
    assert err.keys == ["devices.circuit.twin.hidden"] and "a twin MLP of" in str(err)
    err = mistake(tmp_path, lambda d: d["stack"].__setitem__(0, {"kind": "linear", "size": 65536})
                  or d["stack"].insert(1, {"kind": "linear", "size": 65536}))
    assert "stack.1.size" in err.keys and "a linear layer of 65536 x 65536 weights" in str(err)


def test_every_mistake_is_reported_at_once(tmp_path):
    err = mistake(tmp_path, lambda d: (d["schedule"].update(epochs=0, batch_size="x"), d.update(seed=-1)))
    assert {"schedule.epochs", "schedule.batch_size", "seed"} <= set(err.keys)
    assert len(str(err).splitlines()) == len(err.problems)


def test_missing_file_and_broken_yaml(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert str(info.value).startswith(f"{tmp_path / 'nope.yaml'}: no such configuration file")
    assert "hybrid_mnist" in str(info.value)  # points at the shipped examples
    bad = write(tmp_path, "name: x\nstack: [\n", "broken.yaml")
    with pytest.raises(ConfigError, match=r"broken\.yaml: line \d+, column \d+: not valid YAML"):
        load_config(bad)
    dup = write(tmp_path, "name: a\nname: b\n", "dup.yaml")
    with pytest.raises(ConfigError, match=r"dup\.yaml: .*duplicate key 'name'"):
        load_config(dup)
    top = write(tmp_path, "- just\n- a list\n", "list.yaml")
    with pytest.raises(ConfigError, match=r"list\.yaml: the top level must be a mapping"):
        load_config(top)


def test_an_idx_dataset_is_a_directory_relative_to_the_config_and_a_file_is_refused(tmp_path):
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "train-images-idx3-ubyte").write_bytes(b"")
    data = copy.deepcopy(TINY)
    data["dataset"] = {"name": "idx", "path": "mnist", "val_fraction": 0}
    assert load_config(write(tmp_path, data)).dataset.path == str(tmp_path / "mnist")
    data["dataset"]["path"] = "mnist/train-images-idx3-ubyte"
    with pytest.raises(ConfigError, match=r"dataset\.path: a file, not a directory: .*train-images-idx3-ubyte"):
        load_config(write(tmp_path, data))


def test_val_fraction_0_means_no_validation_split(tmp_path):
    data = copy.deepcopy(TINY)
    data["dataset"]["val_fraction"] = 0
    loaded = load_data(load_config(write(tmp_path, data)))
    assert len(loaded.y_train) == 60 and len(loaded.y_val) == 0


def test_paths_are_relative_to_the_config_file(tmp_path):
    import numpy as np

    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "set.npz", x_train=np.zeros((4, 8)), y_train=np.arange(4) % 2,
             x_test=np.zeros((2, 8)), y_test=np.arange(2) % 2)
    data = copy.deepcopy(TINY)
    data["dataset"] = {"name": "npz", "path": "data/set.npz"}
    cfg = load_config(write(tmp_path, data))
    assert cfg.dataset.path == str(tmp_path / "data" / "set.npz")
    with pytest.raises(ConfigError, match=r"dataset\.path: no such file .*data/data/set\.npz"):
        load_config(write(tmp_path / "data", data))  # from data/, the same relative path points elsewhere


def test_overrides_are_validated_like_the_file(tmp_path):
    path = write(tmp_path, TINY)
    cfg = load_config(path, ["schedule.epochs=3", "devices.circuit.twin.kind=ideal", "stack.3.size=10"])
    assert cfg.schedule.epochs == 3 and cfg.devices["circuit"].twin.kind == "ideal"
    with pytest.raises(ConfigError, match=r"schedule\.epochs: out of range: 0"):
        load_config(path, ["schedule.epochs=0"])
    with pytest.raises(ConfigError, match=r"--set epochs: expected KEY=VALUE"):
        load_config(path, ["epochs"])


def test_cross_checks(tmp_path):
    err = mistake(tmp_path, lambda d: d["devices"].update(spare={"driver": {"kind": "simulated", "system": "shg"}}))
    assert err.keys == ["devices.spare"] and "not used by any layer" in str(err)
    err = mistake(tmp_path, lambda d: d["stack"].insert(3, {"kind": "physical", "device": "circuit"}))
    assert "stack.3.device" in err.keys and "already serves stack.2" in str(err)
    err = mistake(tmp_path, lambda d: (d["devices"]["circuit"].update(
        driver={"kind": "zmq", "address": "tcp://labpc:5555"}), d.update(method="oracle")))
    assert "method" in err.keys and "allowed: pat, in_silico" in str(err)
    assert "devices.circuit.twin.kind" in err.keys  # a zmq device has no physics model unless driver.model says so


def test_stack_widths_are_checked_against_the_devices(tmp_path):
    data = copy.deepcopy(TINY)
    data["stack"][0]["size"] = 6
    cfg = load_config(write(tmp_path, data))
    devices = {name: recipe.build() for name, (recipe,) in device_recipes(cfg).items()}
    with pytest.raises(ConfigError, match=r"stack\.2: device 'circuit' takes 8 inputs but the layers before it "
                                          r"give 6"):
        build_stack(cfg, devices, 64)


def test_unmodelled_physics_is_configured_per_device_and_off_with_ideal(tmp_path):
    raw = {**TINY, "devices": {"circuit": {**TINY["devices"]["circuit"], "driver": {
        **TINY["devices"]["circuit"]["driver"], "imperfections": {"unmodelled": 0.5}}}}}
    (recipe,) = device_recipes(load_config(write(tmp_path, raw)))["circuit"]
    effects = type(recipe.build()).unmodelled_effects
    assert recipe.build().true_model().unmodelled == pytest.approx({k: 0.5 * v for k, v in effects.items()})
    assert recipe.build().true_model().unmodelled != recipe.build().model().unmodelled
    raw["devices"]["circuit"]["driver"]["imperfections"] = {"ideal": True}
    (ideal,) = device_recipes(load_config(write(tmp_path, raw)))["circuit"]
    assert set(ideal.build().true_model().unmodelled.values()) == {0.0}


def test_the_runner_builds_what_the_configuration_says(tmp_path):
    cfg = load_config(write(tmp_path, TINY))
    (recipe,) = device_recipes(cfg)["circuit"]
    assert recipe.label == "circuit" and recipe.replica == 0 and recipe.kind == "simulated"
    device = recipe.build()
    assert device.spec.input.size == 8 and not device.connected  # constructors do no I/O
    assert device.imperfections.seed == 0  # seed * 100 + the device's index in the stack
    data = load_data(cfg)
    # the subset first, then dataset.val_fraction (default 0.1) of its train split becomes validation:
    # 6 digits of each class, round(0.6) = 1 of each
    assert len(data.y_train) == 50 and len(data.y_val) == 10 and len(data.y_test) == 30
    stack = build_stack(cfg, {"circuit": device}, data.n_features)
    (layer,) = stack.physical_layers()
    assert layer.name == "circuit" and layer.device is device
    assert stack[0].in_features == data.n_features and stack[0].out_features == 8 and stack[3].out_features == 10
    train = train_config(cfg)
    assert train.epochs == 1 and train.batch_size == 30 and train.seed == cfg.seed


def test_replicas_are_copies_with_their_own_imperfections(tmp_path):
    data = copy.deepcopy(TINY)
    data["devices"]["circuit"]["replicas"] = 2
    cfg = load_config(write(tmp_path, data))
    recipes = device_recipes(cfg)["circuit"]
    assert [(r.replica, r.label) for r in recipes] == [(0, "circuit"), (1, "circuit/1")]
    a, b = (r.build() for r in recipes)
    assert a.imperfections.seed != b.imperfections.seed
    assert a.identity()["true_calibration"] != b.identity()["true_calibration"]  # two physical copies
    # and the same copies in every run
    assert [r.build().identity()["true_calibration"] for r in device_recipes(cfg)["circuit"]] == \
        [a.identity()["true_calibration"], b.identity()["true_calibration"]]


def test_a_pool_adds_instruments_of_the_same_kind_as_replicas(tmp_path):
    data = copy.deepcopy(TINY)
    member = {"driver": {"kind": "simulated", "system": "circuit", "options": {"n_in": 8, "n_out": 8}, "seed": 7},
              "placement": {"instrument": "bench-2"}}
    data["devices"]["circuit"]["pool"] = [member]
    cfg = load_config(write(tmp_path, data))
    first, second = device_recipes(cfg)["circuit"]
    assert second.label == "circuit/1" and second.placement.instrument == "bench-2"
    assert second.seed == 7 + 1000 and first.seed == 0


def test_shipped_examples_load():
    names = example_configs()
    assert {"hybrid_mnist", "shg_vowels", "plate_mnist", "circuit_mnist", "lab_cluster"} <= set(names)
    for name in names:
        cfg = load_config(example_config_path(name))
        assert cfg.name == name
    lab = load_config(example_config_path("lab_cluster"))
    assert {d.driver.kind for d in lab.devices.values()} == {"zmq", "visa"}
    assert lab.devices["optics"].placement.ray_resources() == {"instrument:shg-bench": 1.0}


def test_quick_changes_only_what_its_section_says():
    for name in example_configs():
        cfg = load_config(example_config_path(name))
        quick = cfg.quick_version()
        full, small = flatten(cfg.resolved()), flatten(quick.resolved())
        changed = {k for k in set(full) | set(small) if full.get(k) != small.get(k) and not k.startswith("quick")}
        assert changed == {k for k, v in cfg.quick.items() if full.get(k) != v}, name
        assert all(small[k] == v for k, v in cfg.quick.items()), name
        assert quick.quick == {} and quick.quick_version() is quick


def test_demo_runs_the_shipped_hybrid_configuration(monkeypatch, capsys):
    from pnn_cluster.commands import demo
    from pnn_cluster.runner import RunResult

    ran = []

    class Recorder:
        def run(self, config, tracking=None, **kw):
            ran.append(config)
            return RunResult(config=config.name, method=config.method, state="finished", test_acc=0.5, steps=1,
                             epochs=1, device_samples=10, calibration_samples=20, init_samples=30, seconds=0.1)

    monkeypatch.setattr(demo, "launcher_for", lambda args: Recorder())
    assert main(["demo", "--quick", "--methods", "pat,in_silico", "--no-track", "--set", "schedule.epochs=1"]) == 0
    shipped = load_config(example_config_path("hybrid_mnist")).quick_version()
    expected = {m: shipped.with_overrides(["schedule.epochs=1", "seed=0", f"method={m}"]).resolved()
                for m in ("pat", "in_silico")}
    assert {c.method: c.resolved() for c in ran} == expected
    assert "hybrid_mnist" in capsys.readouterr().out


@pytest.mark.parametrize("quick, key, words", [
    ({"schedule.epochz": 1}, "quick: schedule.epochz", ["unknown key", "did you mean 'epochs'"]),
    ({"schedule.epochs": 0}, "quick: schedule.epochs", ["out of range: 0", ">= 1"]),
    ({"stack.9.size": 4}, "quick: stack.9.size", ["no such key to override"]),
    ({"devices.nothing.twin.groups": 4}, "quick: devices.nothing.driver", ["missing required key"]),
])
def test_quick_overrides_that_do_not_fit_are_config_errors(tmp_path, quick, key, words):
    err = mistake(tmp_path, lambda d: d.update(quick=quick))
    assert key in err.keys, (key, str(err))
    line = next(line for line in str(err).splitlines() if f": {key}: " in line)
    for w in words:
        assert w in line, (w, line)


def test_parse_config_without_a_file():
    cfg = parse_config(copy.deepcopy(TINY))
    assert cfg.source == "<config>" and cfg.resolved()["tracking"]["experiment"] == "pnn-cluster"


def test_train_command_reports_config_errors_with_exit_code_2(tmp_path, capsys):
    data = copy.deepcopy(TINY)
    data["schedule"]["epochs"] = -1
    path = write(tmp_path, data)
    assert main(["train", str(path), "--no-track"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: schedule.epochs: out of range: -1 (allowed: >= 1 and <= 100000)" in err
    assert main(["train", str(tmp_path / "absent.yaml"), "--no-track"]) == 2
    assert "absent.yaml: no such configuration file" in capsys.readouterr().err
    assert main(["devices", str(path)]) == 2


def test_comments_in_yaml_are_fine(tmp_path):
    text = textwrap.dedent("""\
        # a comment
        name: tiny   # trailing
        dataset: {name: digits}
        devices:
          c: {driver: {kind: simulated, system: circuit}}
        stack:
          - {kind: linear, size: 12}
          - {kind: rescale}
          - {kind: physical, device: c}
        """)
    assert load_config(write(tmp_path, text)).physical_devices() == ["c"]
