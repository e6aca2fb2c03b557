"""Embedded datasets, local file readers and deterministic splits."""

import gzip
import struct

import numpy as np
import pytest

from splitlearn.data import DataError, Table, batches, load_table, train_test_split_ids


# -- embedded datasets -------------------------------------------------------------------------

def test_digits_fields():
    t = load_table("digits")
    x = t.fields["x"]
    assert len(t) == 1797 and x.shape == (1797, 64) and t.fields["image"].shape == (1797, 1, 8, 8)
    assert x.dtype == np.float32 and t.fields["image"].dtype == np.float32
    assert x.min() == 0 and x.max() == 1
    assert np.array_equal(t.fields["image"].reshape(1797, 64), x)
    assert t.fields["y"].dtype == np.int64 and set(np.unique(t.fields["y"])) == set(range(10))
    assert t.fields["parity"].dtype == np.int64 and np.array_equal(t.fields["parity"], t.fields["y"] % 2)
    assert t.ids.dtype == np.int64 and np.array_equal(t.ids, np.arange(1797))


def test_breast_cancer_is_standardised():
    t = load_table("breast_cancer")
    x = t.fields["x"]
    assert x.shape == (569, 30) and x.dtype == np.float32 and len(t.columns["x"]) == 30
    assert t.columns["x"][0] == "mean radius"
    assert np.allclose(x.mean(0), 0, atol=1e-5) and np.allclose(x.std(0), 1, atol=1e-4)
    assert t.fields["y"].dtype == np.int64 and set(np.unique(t.fields["y"])) == {0, 1}


def test_synthetic_is_deterministic_and_learnable():
    from sklearn.linear_model import LogisticRegression

    opts = {"n": 400, "features": 8, "classes": 3, "seed": 1}
    a, b = load_table("synthetic", options=opts), load_table("synthetic", options=dict(opts))
    c = load_table("synthetic", options={**opts, "seed": 2})
    assert np.array_equal(a.fields["x"], b.fields["x"]) and np.array_equal(a.fields["y"], b.fields["y"])
    assert not np.array_equal(a.fields["x"], c.fields["x"])
    x, y = a.fields["x"], a.fields["y"]
    assert x.shape == (400, 8) and x.dtype == np.float32 and y.dtype == np.int64 and set(y.tolist()) == {0, 1, 2}
    acc = LogisticRegression(max_iter=500).fit(x[:300], y[:300]).score(x[300:], y[300:])
    assert acc > 0.6  # chance is 1/3


def test_synthetic_defaults_and_image():
    d = load_table("synthetic")
    assert d.fields["x"].shape == (1000, 20) and set(d.fields["y"].tolist()) == {0, 1} and "image" not in d.fields
    img = load_table("synthetic", options={"n": 10, "image": [3, 32, 32]})
    assert img.fields["image"].shape == (10, 3, 32, 32) and img.fields["image"].dtype == np.float32
    plain = load_table("synthetic", options={"n": 10})
    assert np.array_equal(img.fields["x"], plain.fields["x"])  # asking for an image leaves x alone


@pytest.mark.parametrize("dataset,kwargs,msg", [
    ("imagenet", {}, "unknown dataset 'imagenet'"),
    ("synthetic", {"options": {"size": 3}}, "unknown option(s) ['size']"),
    ("digits", {"options": {"n": 3}}, "allowed: []"),
    ("mnist", {"path": ".", "options": {"limt": 3}}, "allowed: ['limit']"),
    ("synthetic", {"options": {"classes": 1}}, "classes must be an integer >= 2"),
    ("synthetic", {"options": {"n": 0}}, "n must be an integer >= 1"),
    ("synthetic", {"options": {"features": "8"}}, "features must be an integer"),
    ("synthetic", {"options": {"image": [3, 32]}}, "[C, H, W]"),
    ("synthetic", {"options": {"image": [3, 0, 32]}}, "image size must be an integer >= 1"),
    ("csv", {}, "set path"),
    ("digits", {"path": "digits.csv"}, "does not use ['path']"),
])
def test_bad_dataset_settings(dataset, kwargs, msg):
    with pytest.raises(DataError) as e:
        load_table(dataset, **kwargs)
    assert msg in str(e.value)


# -- Table ---------------------------------------------------------------------------------------

def test_select_columns():
    t = load_table("breast_cancer")
    assert np.array_equal(t.select("x", (10, 20)), t.fields["x"][:, 10:20])
    assert t.select("y") is t.fields["y"]
    with pytest.raises(DataError, match=r"no field 'z'; this data has \['x', 'y'\]"):
        t.select("z")
    with pytest.raises(DataError, match=r"columns \[20, 40\) .* has 30 columns"):
        t.select("x", (20, 40))
    with pytest.raises(DataError, match="out of range or empty"):
        t.select("x", (5, 5))
    with pytest.raises(DataError, match="needs a 2-D field"):
        load_table("digits").select("image", (0, 2))


def test_align_and_take():
    t = load_table("breast_cancer")
    ids = np.array([5, 3, 400])
    a = t.align(ids)
    assert np.array_equal(a.ids, ids) and np.array_equal(a.fields["x"], t.fields["x"][[5, 3, 400]])
    assert np.array_equal(a.fields["y"], t.fields["y"][[5, 3, 400]]) and a.columns == t.columns
    shuffled = t.take(np.random.default_rng(0).permutation(len(t)))
    back = shuffled.align(t.ids)
    assert np.array_equal(back.fields["x"], t.fields["x"])
    with pytest.raises(DataError, match=r"2 of the 3 ids are missing here \(first: \[9999, 10000\]\)"):
        t.align(np.array([1, 9999, 10000]))
    with pytest.raises(DataError, match="not unique"):
        t.align(np.array([1, 1]))


def test_table_checks_rows_and_ids():
    with pytest.raises(DataError, match="field 'x' has shape"):
        Table(np.arange(3), {"x": np.zeros((2, 4))})
    with pytest.raises(DataError, match="not unique"):
        Table(np.array([1, 1]), {})
    assert Table(np.arange(3, dtype=np.int32), {}).ids.dtype == np.int64


# -- CSV -----------------------------------------------------------------------------------------

def test_csv_reader(tmp_path):
    p = tmp_path / "clinic.csv"
    p.write_text("patient,age,bp,diagnosis\n7,50,120,sick\n3,30,110,well\n\n9,41,130,sick\n")
    t = load_table("csv", path="clinic.csv", id_column="patient", label_column="diagnosis", base_dir=tmp_path)
    assert t.ids.tolist() == [7, 3, 9] and t.columns["x"] == ["age", "bp"]
    assert t.fields["y"].tolist() == [0, 1, 0] and t.columns["y"] == ["sick", "well"]
    assert t.fields["x"].dtype == np.float32 and t.fields["x"][1].tolist() == [30, 110]


def test_csv_integer_labels_bom_and_standardize(tmp_path):
    p = tmp_path / "a.csv"
    p.write_bytes("\ufeffid,f,label\n10,1,2\n11,3,0\n12,5,2\n".encode("utf-8"))
    t = load_table("csv", path=str(p), id_column="id", label_column="label")
    assert t.fields["y"].tolist() == [2, 0, 2] and "y" not in t.columns
    assert t.fields["x"][:, 0].tolist() == [1, 3, 5]
    # the reader keeps raw values: standardisation is fitted later, on the training rows only
    s = load_table("csv", path=str(p), id_column="id", options={"standardize": True})
    assert s.columns["x"] == ["f", "label"] and s.fields["x"][:, 0].tolist() == [1, 3, 5]
    with pytest.raises(DataError, match="standardize must be true or false"):
        load_table("csv", path=str(p), id_column="id", options={"standardize": "false"})


def test_csv_errors_name_line_and_column(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("id,a,b\n1,2,3\n2,x,4\n")
    with pytest.raises(DataError) as e:
        load_table("csv", path=str(p), id_column="id")
    assert "line 3" in str(e.value) and "column 'a'" in str(e.value) and str(p) in str(e.value)
    p.write_text('id,note,b\n1,"two\nlines",3\n2,5,nan\n')  # a quoted newline: records start on lines 2 and 4
    with pytest.raises(DataError, match=r"line 2, column 'note': 'two\\nlines' is not a finite number"):
        load_table("csv", path=str(p), id_column="id")
    with pytest.raises(DataError, match=r"line 4, column 'b': 'nan' is not a finite number"):
        load_table("csv", path=str(p), id_column="id", label_column="note")


@pytest.mark.parametrize("text,kwargs,msg", [
    ("id,a,b\n1,2,3\n", {"id_column": "pid"}, "no column 'pid'; columns are ['id', 'a', 'b']"),
    ("id,a,b\n1,2,3\n", {"id_column": None}, "set id_column"),
    ("id,a,b\n1,2,3\n", {"id_column": "id", "label_column": "c"}, "no column 'c'"),
    ("id,a\n1,2\n1,3\n", {"id_column": "id"}, "not unique (repeated: [1])"),
    ("id,a\nx7,2\nx7,3\n", {"id_column": "id"}, "not unique"),
    ("id,a,b\n1,2\n", {"id_column": "id"}, "line 2: 2 cells where the header has 3"),
    ("id,a,a\n1,2,3\n", {"id_column": "id"}, "['a'] appear more than once"),
    ("", {"id_column": "id"}, "empty file"),
    ("id,a\n", {"id_column": "id"}, "no rows after the header"),
])
def test_csv_bad_files(tmp_path, text, kwargs, msg):
    p = tmp_path / "t.csv"
    p.write_text(text)
    with pytest.raises(DataError) as e:
        load_table("csv", path=str(p), **kwargs)
    assert msg in str(e.value) and str(p) in str(e.value)


def test_csv_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_table("csv", path="nope.csv", id_column="id", base_dir=tmp_path)


# -- MNIST idx -----------------------------------------------------------------------------------

def _idx(path, arr, type_code=0x08, ndim=None):
    arr = np.asarray(arr)
    dtype = {0x08: ">u1", 0x0D: ">f4"}[type_code]
    header = bytes([0, 0, type_code, arr.ndim if ndim is None else ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(dtype).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def _mnist_folder(folder, n_train=12, n_test=4, gz=("train-labels", "t10k-images")):
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 256, (n_test, 28, 28))
    files = {"train-images": train, "train-labels": np.arange(n_train) % 10,
             "t10k-images": test, "t10k-labels": np.arange(n_test) % 10}
    for stem, arr in files.items():
        kind = "idx3" if arr.ndim == 3 else "idx1"
        _idx(folder / f"{stem}-{kind}-ubyte{'.gz' if stem in gz else ''}", arr)
    return train, test


def test_mnist_idx_reader(tmp_path):
    train, test = _mnist_folder(tmp_path)
    t = load_table("mnist", path=str(tmp_path))
    assert t.fields["x"].shape == (16, 784) and t.fields["image"].shape == (16, 1, 28, 28)
    assert t.fields["x"].dtype == np.float32 and 0 <= t.fields["x"].min() and t.fields["x"].max() <= 1
    assert np.allclose(t.fields["image"][:12, 0] * 255, train) and np.allclose(t.fields["image"][12:, 0] * 255, test)
    assert np.array_equal(t.fields["x"], t.fields["image"].reshape(16, 784))
    assert t.fields["y"].dtype == np.int64 and t.fields["y"].tolist() == list(range(10)) + [0, 1, 0, 1, 2, 3]
    assert t.fields["is_test"].dtype == np.int8 and t.fields["is_test"].tolist() == [0] * 12 + [1] * 4
    assert np.array_equal(t.ids, np.arange(16))
    tr, te = train_test_split_ids(t.ids, 0.5, 0, t.fields["is_test"])
    assert tr.tolist() == list(range(12)) and te.tolist() == [12, 13, 14, 15]


def test_mnist_limit(tmp_path):
    train, test = _mnist_folder(tmp_path, n_train=30, n_test=10)
    t = load_table("mnist", path=tmp_path.name, base_dir=tmp_path.parent, options={"limit": 12})
    assert len(t) == 14 and t.fields["is_test"].tolist() == [0] * 12 + [1] * 2
    assert np.allclose(t.fields["image"][12:, 0] * 255, test[:2])
    with pytest.raises(DataError, match="limit must be a positive integer"):
        load_table("mnist", path=str(tmp_path), options={"limit": 0})


def test_mnist_corrupt_files_are_named(tmp_path):
    _mnist_folder(tmp_path, n_train=2, n_test=1, gz=())
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")  # says 5 labels, holds 1
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: 9 bytes where the header \[5\] implies 13"):
        load_table("mnist", path=str(tmp_path))
    labels.write_bytes(b"PK\x03\x04junk")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: bad magic number 0x504B0304, expected 0x00000801"):
        load_table("mnist", path=str(tmp_path))
    labels.write_bytes(b"\x00\x00\x08")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: bad magic"):
        load_table("mnist", path=str(tmp_path))
    labels.write_bytes(b"\x00\x00\x08\x01\x00\x00")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: truncated header"):
        load_table("mnist", path=str(tmp_path))
    _idx(labels, np.zeros(1))
    _idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28)), ndim=1)  # labels' magic on an image file
    with pytest.raises(DataError, match="train-images-idx3-ubyte: bad magic number 0x00000801, expected 0x00000803"):
        load_table("mnist", path=str(tmp_path))
    _idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28)), type_code=0x0D)  # float32, not bytes
    with pytest.raises(DataError, match="train-images-idx3-ubyte: bad magic number 0x00000D03"):
        load_table("mnist", path=str(tmp_path))


def test_mnist_bad_gzip_and_missing_file(tmp_path):
    _mnist_folder(tmp_path, n_train=2, n_test=1, gz=("t10k-images",))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: cannot read"):
        load_table("mnist", path=str(tmp_path))
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"no t10k-images-idx3-ubyte \(or t10k-images-idx3-ubyte\.gz\)"):
        load_table("mnist", path=str(tmp_path))
    with pytest.raises(DataError, match="not a folder"):
        load_table("mnist", path=str(tmp_path / "missing"))


def test_mnist_count_mismatch(tmp_path):
    _mnist_folder(tmp_path, n_train=3, n_test=1, gz=())
    _idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2))
    with pytest.raises(DataError, match="holds 3 images but .*train-labels-idx1-ubyte holds 2 labels"):
        load_table("mnist", path=str(tmp_path))


# -- splits and batches --------------------------------------------------------------------------

def test_split_is_deterministic_and_disjoint():
    ids = np.arange(100) * 3 + 5
    a = train_test_split_ids(ids, 0.2, 7)
    b = train_test_split_ids(np.random.default_rng(1).permutation(ids), 0.2, 7)  # input order does not matter
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    train, test = a
    assert len(test) == 20 and len(train) == 80 and not set(train) & set(test)
    assert set(train) | set(test) == set(ids)
    assert np.array_equal(train, np.sort(train)) and np.array_equal(test, np.sort(test))
    assert not np.array_equal(train_test_split_ids(ids, 0.2, 8)[1], test)
    assert train_test_split_ids(ids, 0.5, 7)[1].size == 50
    with pytest.raises(DataError, match="is_test has 3 entries for 100 ids"):
        train_test_split_ids(ids, 0.2, 7, np.zeros(3))
    with pytest.raises(DataError, match="test_fraction"):
        train_test_split_ids(ids, 1.5, 7)


def test_batches_cover_every_position_once():
    e0, e1 = batches(100, 32, 7, 0), batches(100, 32, 7, 1)
    assert [len(b) for b in e0] == [32, 32, 32, 4]
    for epoch in (e0, e1):
        assert sorted(np.concatenate(epoch).tolist()) == list(range(100))
    assert not np.array_equal(np.concatenate(e0), np.concatenate(e1))
    assert all(np.array_equal(x, y) for x, y in zip(e0, batches(100, 32, 7, 0)))
    assert not np.array_equal(np.concatenate(e0), np.arange(100))
    assert np.array_equal(np.concatenate(batches(10, 4, 0, 0, shuffle=False)), np.arange(10))
    assert [len(b) for b in batches(10, 4, 0, 0, shuffle=False)] == [4, 4, 2]
    assert batches(0, 4, 0, 0) == []
    with pytest.raises(DataError, match="batch size"):
        batches(10, 0, 0, 0)


def test_the_embedded_digits_are_scikit_learns_bit_for_bit():
    """``digits()`` reads scikit-learn's file itself (importing scikit-learn costs a party process 1.5 s): the same
    rows, values and labels as ``load_digits``."""
    from sklearn.datasets import load_digits

    from splitlearn.data.embedded import digits

    d, t = load_digits(), digits()
    assert np.array_equal(t.fields["x"], (d.data / 16.0).astype(np.float32))
    assert np.array_equal(t.fields["y"], d.target.astype(np.int64)) and t.fields["image"].shape == (1797, 1, 8, 8)


@pytest.mark.parametrize("name", ["breast_cancer", "wine", "diabetes"])
def test_the_other_embedded_tables_are_scikit_learns_bit_for_bit(name):
    """Breast cancer, wine and diabetes are read from scikit-learn's files without importing it (2 s a party
    process): the values (z-scored as before, or diabetes' scaled ones), targets and column names of its loaders."""
    import sklearn.datasets

    from splitlearn.data import embedded

    d, t = getattr(sklearn.datasets, f"load_{name}")(), getattr(embedded, name)()
    if name == "diabetes":
        x, y = d.data.astype(np.float32), d.target.astype(np.float32)
    else:
        x, y = ((d.data - d.data.mean(0)) / d.data.std(0)).astype(np.float32), d.target.astype(np.int64)
    assert np.array_equal(t.fields["x"], x) and t.fields["x"].dtype == x.dtype
    assert np.array_equal(t.fields["y"], y) and t.fields["y"].dtype == y.dtype
    assert t.columns["x"] == list(d.feature_names) and len(t.ids) == len(y)