"""Embedded datasets, local file readers and deterministic splits."""

import gzip
import struct

import numpy as np
import pytest

from splitlearn.data import DataError, batches, load_table, train_test_split_ids


def test_digits_fields():
    t = load_table("digits")
    assert len(t) == 1797 and t.fields["x"].shape == (1797, 64) and t.fields["image"].shape == (1797, 1, 8, 8)
    assert t.fields["x"].dtype == np.float32 and 0 <= t.fields["x"].min() and t.fields["x"].max() <= 1
    assert set(np.unique(t.fields["y"])) == set(range(10))
    assert np.array_equal(t.fields["parity"], t.fields["y"] % 2)


def test_breast_cancer_is_standardised():
    t = load_table("breast_cancer")
    x = t.fields["x"]
    assert x.shape == (569, 30) and len(t.columns["x"]) == 30
    assert np.allclose(x.mean(0), 0, atol=1e-5) and np.allclose(x.std(0), 1, atol=1e-4)


def test_synthetic_is_deterministic_and_learnable():
    from sklearn.linear_model import LogisticRegression

    a = load_table("synthetic", options={"n": 400, "features": 8, "classes": 3, "seed": 1})
    b = load_table("synthetic", options={"n": 400, "features": 8, "classes": 3, "seed": 1})
    c = load_table("synthetic", options={"n": 400, "features": 8, "classes": 3, "seed": 2})
    assert np.array_equal(a.fields["x"], b.fields["x"]) and not np.array_equal(a.fields["x"], c.fields["x"])
    x, y = a.fields["x"], a.fields["y"]
    acc = LogisticRegression(max_iter=500).fit(x[:300], y[:300]).score(x[300:], y[300:])
    assert acc > 0.6  # chance is 1/3
    img = load_table("synthetic", options={"n": 10, "image": [3, 32, 32]})
    assert img.fields["image"].shape == (10, 3, 32, 32)


@pytest.mark.parametrize("kwargs,msg", [
    ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
    ({"dataset": "synthetic", "options": {"size": 3}}, "unknown option(s) ['size']"),
    ({"dataset": "synthetic", "options": {"classes": 1}}, "classes >= 2"),
    ({"dataset": "csv"}, "set path"),
])
def test_bad_dataset_settings(kwargs, msg):
    with pytest.raises(DataError) as e:
        load_table(kwargs.pop("dataset"), **kwargs)
    assert msg in str(e.value)


def test_select_columns_and_align():
    t = load_table("breast_cancer")
    assert t.select("x", (10, 20)).shape == (569, 10)
    with pytest.raises(DataError, match="no field 'z'"):
        t.select("z")
    with pytest.raises(DataError, match=r"columns \[20, 40\)"):
        t.select("x", (20, 40))
    ids = np.array([5, 3, 400])
    a = t.align(ids)
    assert np.array_equal(a.ids, ids) and np.array_equal(a.fields["x"][1], t.fields["x"][3])
    with pytest.raises(DataError, match="2 of the 3 ids are missing"):
        t.align(np.array([1, 9999, 10000]))


def test_csv_reader(tmp_path):
    p = tmp_path / "clinic.csv"
    p.write_text("patient,age,bp,diagnosis\n7,50,120,sick\n3,30,110,well\n9,41,130,sick\n")
    t = load_table("csv", path="clinic.csv", id_column="patient", label_column="diagnosis", base_dir=tmp_path)
    assert t.ids.tolist() == [7, 3, 9] and t.columns["x"] == ["age", "bp"]
    assert t.fields["y"].tolist() == [0, 1, 0] and t.columns["y"] == ["sick", "well"]
    assert t.fields["x"].dtype == np.float32 and t.fields["x"][1].tolist() == [30, 110]


def test_csv_errors_name_line_and_column(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("id,a,b\n1,2,3\n2,x,4\n")
    with pytest.raises(DataError) as e:
        load_table("csv", path=str(p), id_column="id")
    assert "line 3" in str(e.value) and "column 'a'" in str(e.value) and str(p) in str(e.value)
    with pytest.raises(DataError, match="no column 'pid'"):
        load_table("csv", path=str(p), id_column="pid")
    p.write_text("id,a\n1,2\n1,3\n")
    with pytest.raises(DataError, match="not unique"):
        load_table("csv", path=str(p), id_column="id")


def _idx(path, arr, magic_type=0x08):
    header = bytes([0, 0, magic_type, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_mnist_idx_reader(tmp_path):
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 256, (4, 28, 28))
    _idx(tmp_path / "train-images-idx3-ubyte", train)
    _idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(12) % 10)
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", test)
    _idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(4))
    t = load_table("mnist", path=str(tmp_path))
    assert t.fields["x"].shape == (16, 784) and t.fields["image"].shape == (16, 1, 28, 28)
    assert np.allclose(t.fields["image"][0, 0] * 255, train[0])
    assert t.fields["is_test"].tolist() == [0] * 12 + [1] * 4
    tr, te = train_test_split_ids(t.ids, 0.5, 0, t.fields["is_test"])
    assert te.tolist() == [12, 13, 14, 15]


def test_mnist_corrupt_files_are_named(tmp_path):
    _idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28)))
    _idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2))
    _idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((1, 28, 28)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")  # says 5, has 1
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_table("mnist", path=str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(DataError, match="bad magic"):
        load_table("mnist", path=str(tmp_path))


def test_split_and_batches_are_deterministic():
    ids = np.arange(100)
    a = train_test_split_ids(ids, 0.2, 7)
    b = train_test_split_ids(ids, 0.2, 7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len(a[1]) == 20 and not set(a[0]) & set(a[1]) and set(a[0]) | set(a[1]) == set(ids)
    e0, e1 = batches(100, 32, 7, 0), batches(100, 32, 7, 1)
    assert [len(b) for b in e0] == [32, 32, 32, 4]
    assert sorted(np.concatenate(e0).tolist()) == list(range(100))
    assert not np.array_equal(np.concatenate(e0), np.concatenate(e1))
    assert np.array_equal(np.concatenate(batches(10, 4, 0, 0, shuffle=False)), np.arange(10))
