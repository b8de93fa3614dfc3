import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

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


#: instruments the two simulated lab PCs of the shared test cluster declare
LAB_INSTRUMENTS = ("shg-bench-1", "circuit-bench-2")


@pytest.fixture(scope="session")
def ray_cluster():
    """The one Ray instance of a test session: a head node and two lab PCs, each declaring one instrument.

    Started by the first system test that asks for it, shut down at the end of
    the session. Device actors without an instrument run on any node.
    """
    import types

    import ray
    from ray.cluster_utils import Cluster

    from actors.cluster import INSTRUMENT_PREFIX

    if ray.is_initialized():
        pytest.fail("a test connected to Ray on its own; system tests share the ray_cluster fixture")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    labs = {name: cluster.add_node(num_cpus=1, resources={INSTRUMENT_PREFIX + name: 1}).node_id
            for name in LAB_INSTRUMENTS}
    tests_dir = str(Path(__file__).resolve().parent)
    # workers import device classes defined in test modules by name, as a lab's own driver module would be
    ray.init(address=cluster.address, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": tests_dir, "OMP_NUM_THREADS": "1"}})
    try:
        yield types.SimpleNamespace(cluster=cluster, address=cluster.address, lab_nodes=labs,
                                    head_node=cluster.head_node.node_id)
    finally:
        ray.shutdown()
        cluster.shutdown()
