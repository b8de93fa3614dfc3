import numpy as np
import pytest

from pnn_cluster.data import digits, load_dataset, load_npz, mnist5k, vowels


def test_mnist5k_fixed_split():
    a, b = mnist5k(), mnist5k()
    assert a.x_train.shape == (4000, 784) and a.x_test.shape == (1000, 784)
    assert 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0
    np.testing.assert_array_equal(a.y_test, b.y_test)


def test_digits_split():
    d = digits()
    assert d.x_train.shape == (1437, 64) and d.n_classes == 10


def test_vowels_from_csv(vowels_path):
    v = vowels(vowels_path)
    assert v.x_train.shape == (210, 12) and v.x_test.shape == (49, 12) and v.n_classes == 7


def test_vowels_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        vowels(tmp_path / "nope.csv")


def test_vowels_bad_split_names_the_line(tmp_path):
    f = tmp_path / "v.csv"
    f.write_text("split,label,f0\ntrain,1,0.5\nvalid,2,0.1\n")
    with pytest.raises(ValueError, match=r"v.csv:3: split must be"):
        vowels(f)


def test_npz_loader(tmp_path):
    f = tmp_path / "m.npz"
    np.savez(f, x_train=np.full((5, 2, 2), 255), y_train=np.arange(5), x_test=np.zeros((3, 2, 2)),
             y_test=np.arange(3))
    d = load_npz(f)
    assert d.x_train.shape == (5, 4) and d.x_train.max() == 1.0
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar")


def test_subset_is_balanced():
    s = mnist5k().subset(200, 50)
    assert len(s.y_train) == 200 and np.bincount(s.y_train).min() >= 15
