"""Fixtures of every tier, and the tiers themselves: each test is marked by the directory it lives in.

``tests/unit`` (marker ``unit``): no socket, no subprocess, no Ray; ``unit_timeout`` seconds a test (pyproject).
``tests/system`` (``system``): loopback servers, Ray (``ray_cluster``), command-line subprocesses, whole
trainings end to end.
``tests/deploy`` (``deploy``): the files of ``deploy/``, and the documented deployment brought up on loopback.
``tests/chaos`` (``chaos``): servers and trainings killed, frozen and restarted on purpose.
A test file anywhere else is a collection error. Shared helpers: ``tests/helpers.py``.
"""

import os
import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

TESTS = Path(__file__).resolve().parent
#: the tier directories under tests/, each also the name of its marker
TIERS = ("unit", "system", "deploy", "chaos")


def pytest_addoption(parser):
    parser.addini("unit_timeout", "seconds a test of tests/unit may take (setup and teardown included), unless it "
                                  "has a timeout marker of its own", default="30")


def pytest_collection_modifyitems(config, items):
    unit_timeout = float(config.getini("unit_timeout"))
    for item in items:
        try:
            tier = item.path.relative_to(TESTS).parts[0]
        except ValueError:
            continue  # not a test of this suite
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.path}: a test belongs in a tier directory: "
                                    f"{', '.join(f'tests/{t}/' for t in TIERS)} (see tests/conftest.py)")
        item.add_marker(tier)
        if tier == "unit":
            if "ray_cluster" in getattr(item, "fixturenames", ()):  # refused before the session's cluster starts
                raise pytest.UsageError(f"{item.nodeid}: a unit test may not use the ray_cluster fixture: a test "
                                        "that needs Ray belongs in tests/system/")
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(unit_timeout))


VOWELS = Path(__file__).resolve().parents[2] / "shared" / "data" / "vowels_hillenbrand_7class.csv"


@pytest.fixture
def vowels_path():
    if not VOWELS.is_file():
        pytest.skip(f"vowel data not present at {VOWELS}")
    return VOWELS


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    # no test ever writes mlflow.db or mlruns/ into the working tree
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store with its tables made, once a session: MLflow's migrations take seconds for
    every new store, a copy of this file milliseconds. Copy it where a test's store goes, before MLflow opens it."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    SqlAlchemyStore(f"sqlite:///{path}", str(path.parent / "artifacts")).engine.dispose()
    return path


@pytest.fixture
def mlflow_store(tmp_path, mlflow_template) -> str:
    """The test's own MLflow store, where MLFLOW_TRACKING_URI points (``tmp_path/mlflow.db``), its tables
    already made (a copy of ``mlflow_template``); its URI."""
    shutil.copyfile(mlflow_template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


#: the two simulated lab PCs of the shared test cluster and the instruments each declares
LAB_PCS = {"labpc-optics": ("shg-bench-1", "amp-bench-1"), "labpc-electronics": ("circuit-bench-2", "amp-bench-2")}
LAB_INSTRUMENTS = tuple(i for instruments in LAB_PCS.values() for i in instruments)


@pytest.fixture(scope="session")
def ray_cluster():
    """The one Ray instance of a test session: a head node and two lab PCs, each declaring its instruments.

    Started by the first system test that asks for it, shut down at the end of
    the session. Device actors without an instrument run on any node.
    ``lab_nodes`` maps each instrument to the node id of the PC that declared it.
    """
    import types

    import ray
    from ray.cluster_utils import Cluster

    from actors.cluster import INSTRUMENT_PREFIX

    if ray.is_initialized():
        pytest.fail("a test connected to Ray on its own; system tests share the ray_cluster fixture")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    labs = {}
    for instruments in LAB_PCS.values():
        node = cluster.add_node(num_cpus=1, resources={INSTRUMENT_PREFIX + i: 1 for i in instruments})
        labs.update({i: node.node_id for i in instruments})
    # workers import device classes by name from tests/ (lab_devices), as from a lab's own driver module
    ray.init(address=cluster.address, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}})
    try:
        yield types.SimpleNamespace(cluster=cluster, address=cluster.address, lab_nodes=labs,
                                    head_node=cluster.head_node.node_id)
    finally:
        ray.shutdown()
        cluster.shutdown()
