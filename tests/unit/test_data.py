import numpy as np
import pytest

from pnn_cluster.data import Dataset, digits, load_dataset, load_idx, load_npz, mnist5k, vowels


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


# -- the validation split -------------------------------------------------------------------------------


def imbalanced(seed=0):
    """Four classes of 50, 30, 12 and 2 train samples, and a test split of its own."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(4), [50, 30, 12, 2])
    x = np.column_stack([np.arange(len(y)), rng.normal(size=len(y))])  # column 0 names the sample
    y_test = np.arange(20) % 4
    return Dataset("imb", x, y, rng.normal(size=(20, 2)), y_test)


def test_with_validation_is_stratified_and_gives_every_class_at_least_one_sample():
    d = imbalanced().with_validation(0.1, seed=0)
    assert np.bincount(d.y_val, minlength=4).tolist() == [5, 3, 1, 1]  # round(0.1 n), at least one per class
    assert np.bincount(d.y_train, minlength=4).tolist() == [45, 27, 11, 1]
    assert d.x_val.dtype == np.float32 and d.x_val.shape == (10, 2)


def test_with_validation_is_disjoint_from_train_and_together_they_are_the_old_train():
    before = imbalanced()
    d = before.with_validation(0.25, seed=3)
    train_ids, val_ids = set(d.x_train[:, 0].tolist()), set(d.x_val[:, 0].tolist())
    assert not train_ids & val_ids
    assert train_ids | val_ids == set(before.x_train[:, 0].tolist())
    # each sample keeps its label
    np.testing.assert_array_equal(d.y_val, before.y_train[d.x_val[:, 0].astype(int)])


def test_with_validation_is_deterministic_for_a_seed():
    a, b = imbalanced().with_validation(0.2, seed=7), imbalanced().with_validation(0.2, seed=7)
    np.testing.assert_array_equal(a.x_val, b.x_val)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    c = imbalanced().with_validation(0.2, seed=8)
    assert not np.array_equal(a.x_val, c.x_val)


def test_with_validation_leaves_the_test_split_untouched():
    before = imbalanced()
    d = before.with_validation(0.5, seed=0)
    np.testing.assert_array_equal(d.x_test, before.x_test)
    np.testing.assert_array_equal(d.y_test, before.y_test)


def test_no_validation_split_is_empty_arrays_of_the_right_width_and_fraction_0_keeps_it_so():
    d = imbalanced()
    assert d.x_val.shape == (0, 2) and d.y_val.shape == (0,)
    assert d.with_validation(0.0, seed=0) is d
    with pytest.raises(ValueError, match="outside"):
        d.with_validation(1.0, seed=0)
    with pytest.raises(ValueError, match="already has a validation split"):
        d.with_validation(0.1, seed=0).with_validation(0.1, seed=0)


def test_subset_first_then_validation_carves_from_the_subset():
    s = mnist5k().subset(200, 50).with_validation(0.1, seed=0)
    assert len(s.y_train) + len(s.y_val) == 200 and len(s.y_test) == 50
    assert len(s.y_val) == 20 and np.bincount(s.y_val, minlength=10).min() >= 1
    kept = s.subset(100, 20)  # a subset of a split dataset keeps its validation split
    assert len(kept.y_train) == 100 and len(kept.y_val) == 20


# -- MNIST / Fashion-MNIST from IDX files --------------------------------------------------------------------


def write_idx(path, array: np.ndarray, magic: int | None = None, gz: bool = False) -> None:
    import gzip

    header = (magic if magic is not None else 0x0800 | array.ndim).to_bytes(4, "big")
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(f"{path}.gz", "wb") as fh:
            fh.write(raw)
    else:
        path.write_bytes(raw)


def tiny_idx(directory, gz: bool = False):
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, size=(6, 4, 3)),
              "train-labels-idx1-ubyte": np.array([0, 1, 2, 0, 1, 2]),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(3, 4, 3)),
              "t10k-labels-idx1-ubyte": np.array([2, 1, 0])}
    directory.mkdir(exist_ok=True)
    for name, a in arrays.items():
        write_idx(directory / name, a, gz=gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_idx_loader_round_trips_mnist_layout(tmp_path, gz):
    arrays = tiny_idx(tmp_path / "fashion", gz=gz)
    d = load_idx(tmp_path / "fashion")
    assert d.name == "fashion" and d.x_train.shape == (6, 12) and d.x_test.shape == (3, 12)
    np.testing.assert_allclose(d.x_train * 255, arrays["train-images-idx3-ubyte"].reshape(6, 12), atol=1e-4)
    np.testing.assert_array_equal(d.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0 and d.n_classes == 3
    same = load_dataset("idx", tmp_path / "fashion")
    np.testing.assert_array_equal(same.x_test, d.x_test)


def test_idx_loader_rejects_a_bad_magic_number_naming_the_file(tmp_path):
    tiny_idx(tmp_path)
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    write_idx(bad, np.array([2, 1, 0]), magic=0x00000803)  # an image header on the label file
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: magic number 0x00000803, expected 0x00000801"):
        load_idx(tmp_path)


def test_idx_loader_says_which_file_is_missing_or_short(tmp_path):
    tiny_idx(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"no train-labels-idx1-ubyte \(or train-labels-idx1-ubyte\.gz\)"):
        load_idx(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: 3 labels, expected 6"):
        load_idx(tmp_path)
    f = tmp_path / "t10k-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: \d+ bytes, expected \d+"):
        load_idx(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_idx(tmp_path / "nowhere")


# -- k-fold cross-validation --------------------------------------------------------------------------------


def pooled_ids(d: Dataset) -> list[float]:
    return sorted(np.concatenate([d.x_train[:, 0], d.x_test[:, 0], d.x_val[:, 0]]).tolist())


def test_folds_partition_the_pooled_rows_exactly_and_never_share_a_row_with_train():
    before = imbalanced()
    before.x_test[:, 0] = np.arange(1000, 1000 + len(before.y_test))  # test rows get names of their own too
    k = 5
    tested: list[float] = []
    for i in range(k):
        f = before.fold(k, i, seed=0)
        train, test = set(f.x_train[:, 0].tolist()), set(f.x_test[:, 0].tolist())
        assert not train & test
        assert pooled_ids(f) == pooled_ids(before)  # train and test of the fold are all the rows, once
        assert len(f.y_val) == 0
        tested += f.x_test[:, 0].tolist()
    assert sorted(tested) == pooled_ids(before)  # every row is tested in exactly one fold


def test_folds_keep_each_row_with_its_label():
    before = imbalanced()
    before.x_test[:, 0] = np.arange(1000, 1000 + len(before.y_test))
    label = dict(zip(np.concatenate([before.x_train[:, 0], before.x_test[:, 0]]).tolist(),
                     np.concatenate([before.y_train, before.y_test]).tolist()))
    f = before.fold(4, 1, seed=2)
    assert [label[v] for v in f.x_test[:, 0].tolist()] == f.y_test.tolist()
    assert [label[v] for v in f.x_train[:, 0].tolist()] == f.y_train.tolist()


@pytest.mark.parametrize("k", [2, 3, 5, 7])
def test_each_class_is_spread_over_the_folds_within_one_row_of_even(k):
    d = imbalanced()
    y = np.concatenate([d.y_train, d.y_test])
    per_fold = np.array([np.bincount(d.fold(k, i, seed=1).y_test, minlength=4) for i in range(k)])
    total = np.bincount(y, minlength=4)
    np.testing.assert_array_equal(per_fold.sum(axis=0), total)
    assert (per_fold >= total // k).all() and (per_fold <= -(-total // k)).all()
    sizes = per_fold.sum(axis=1)
    assert sizes.max() - sizes.min() <= 1


def test_the_same_seed_gives_the_same_folds_and_another_seed_others():
    d = imbalanced()
    np.testing.assert_array_equal(d.fold_assignment(5, 3), d.fold_assignment(5, 3))
    a, b = d.fold(5, 0, seed=3), d.fold(5, 0, seed=3)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(d.fold_assignment(5, 3), d.fold_assignment(5, 4))


def test_fold_refuses_bad_arguments_and_a_dataset_already_split_for_validation():
    d = imbalanced()
    with pytest.raises(ValueError, match="fold 5 of 5"):
        d.fold(5, 5, seed=0)
    with pytest.raises(ValueError, match="1 folds"):
        d.fold(1, 0, seed=0)
    with pytest.raises(ValueError, match="fold first, then with_validation"):
        d.with_validation(0.1, seed=0).fold(5, 0, seed=0)


def test_vowel_folds_stratified(vowels_path):
    v = vowels(vowels_path)
    folds = [v.fold(5, i, seed=0) for i in range(5)]
    assert sorted(len(f.y_test) for f in folds) == [51, 52, 52, 52, 52]
    for f in folds:
        assert len(f.y_train) + len(f.y_test) == 259
        assert set(np.bincount(f.y_test, minlength=7).tolist()) <= {7, 8}  # 37 per class over 5 folds


def fold_config(tmp_path, **dataset):
    import yaml

    from pnn_cluster.config import load_config

    data = {"name": "folds", "dataset": {"name": "digits", **dataset},
            "devices": {"circuit": {"driver": {"kind": "simulated", "system": "circuit",
                                               "options": {"n_in": 8, "n_out": 8}}}},
            "stack": [{"kind": "linear", "size": 8}, {"kind": "rescale"}, {"kind": "physical", "device": "circuit"},
                      {"kind": "linear", "size": 10}]}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(path)


@pytest.mark.parametrize("dataset, words", [
    ({"folds": 5, "fold": 5}, ["dataset.fold: fold 5 is not one of the 5 folds", "allowed: an integer from 0 to 4"]),
    ({"folds": 5, "fold": 7}, ["dataset.fold: fold 7", "allowed: an integer from 0 to 4"]),
    ({"folds": 1}, ["dataset.folds: folds 1 is not a cross-validation",
                    "allowed: 0 (the dataset's own split) or an integer from 2 to"]),
    ({"fold": 2}, ["dataset.fold: fold 2 without folds", "allowed: 0, or set folds"]),
    ({"folds": -1}, ["dataset.folds: out of range: -1"]),
])
def test_config_refuses_a_fold_outside_its_folds_naming_the_field(tmp_path, dataset, words):
    from pnn_cluster.config import ConfigError

    with pytest.raises(ConfigError) as info:
        fold_config(tmp_path, **dataset)
    for w in words:
        assert w in str(info.value), str(info.value)


def test_load_data_takes_the_fold_before_the_subset_and_the_validation_split(tmp_path):
    from pnn_cluster.runner.build import load_data

    cfg = fold_config(tmp_path, folds=4, fold=1, split_seed=3, val_fraction=0.1)
    assert (cfg.dataset.folds, cfg.dataset.fold) == (4, 1)
    data = load_data(cfg)
    expected = digits(seed=3).fold(4, 1, seed=3)
    np.testing.assert_array_equal(data.x_test, expected.x_test)
    assert len(data.y_train) + len(data.y_val) == len(expected.y_train)  # validation carved from the fold's train
    assert len(data.y_val) > 0 and len(data.y_test) in (449, 450)
    small = load_data(fold_config(tmp_path, folds=4, fold=1, split_seed=3, train_subset=100, test_subset=40))
    assert len(small.y_train) + len(small.y_val) == 100 and len(small.y_test) == 40
    assert {row.tobytes() for row in small.x_test} <= {row.tobytes() for row in expected.x_test}
    assert cfg.dataset.model_dump()["folds"] == 4
    default = fold_config(tmp_path)
    assert (default.dataset.folds, default.dataset.fold) == (0, 0)
