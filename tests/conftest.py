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
