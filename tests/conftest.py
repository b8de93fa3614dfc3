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
