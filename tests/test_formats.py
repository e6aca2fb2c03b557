"""File formats a data holder has: string ids, CSV classes, Parquet, .npz, folders and CSVs of images."""

import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from splitlearn.data import DataError, Table, infer_dataset, load_table, train_test_split_ids


# -- string ids ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cells,expected", [
    (["P0161", " P0007 "], np.array(["P0161", "P0007"])),
    (["0161", "162"], np.array(["0161", "162"])),  # '0161' is not a canonical integer: all are strings
    (["161", " -7 "], np.array([161, -7])),
    (["+5", "6"], np.array(["+5", "6"])),
])
def test_csv_id_kinds(tmp_path, cells, expected):
    p = tmp_path / "t.csv"
    p.write_text("id,a\n" + "".join(f"{c},{i}\n" for i, c in enumerate(cells)))
    t = load_table("csv", path=str(p), id_column="id")
    assert t.ids.dtype.kind == expected.dtype.kind and t.ids.tolist() == expected.tolist()
    assert t.ids.dtype == (np.int64 if expected.dtype.kind == "i" else t.ids.dtype)


def test_table_with_string_ids():
    t = Table(["b", "a", "c"], {"x": np.arange(6.0).reshape(3, 2)})
    assert t.ids.dtype.kind == "U" and t.ids.tolist() == ["b", "a", "c"]
    a = t.align(np.array(["c", "b"]))
    assert a.ids.tolist() == ["c", "b"] and a.fields["x"].tolist() == [[4, 5], [0, 1]]
    assert t.take(np.array([1])).ids.tolist() == ["a"] and t.select("x", (1, 2)).tolist() == [[1], [3], [5]]
    assert Table(np.array(["x", "y"], dtype=object), {}).ids.dtype.kind == "U"
    with pytest.raises(DataError, match=r"6 of the 7 ids are missing here \(first: \['m0', 'm1', 'm2', 'm3', 'm4'\]\)"):
        t.align(["a"] + [f"m{i}" for i in range(6)])
    with pytest.raises(DataError, match="ids to align to are integers .* this data's ids are strings"):
        t.align(np.array([1, 2]))
    with pytest.raises(DataError, match=r"ids mix integers and strings \(e.g. 1 and 'a'\)"):
        Table([1, "a"], {})
    with pytest.raises(DataError, match=r"ids are not unique \(repeated: \['a'\]\)"):
        Table(["a", "b", "a"], {})
    with pytest.raises(DataError, match="integers or strings, got an array of float64"):
        Table(np.array([1.5, 2.0]), {})


def test_csv_repeated_string_ids(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("id,a\nP1,1\nP2,2\nP1,3\n")
    with pytest.raises(DataError, match=r"t.csv: ids in column 'id' are not unique \(repeated: \['P1'\]\)"):
        load_table("csv", path=str(p), id_column="id")
    p.write_text("id,a\nP1,1\n ,2\n")
    with pytest.raises(DataError, match=r"t.csv, line 3, column 'id': empty id"):
        load_table("csv", path=str(p), id_column="id")


# -- CSV classes, standardize no longer applied --------------------------------------------------

def test_csv_classes_option(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("id,f,diagnosis\nP1,1,malignant\nP2,3,benign\nP3,5, malignant\n")
    t = load_table("csv", path=str(p), id_column="id", label_column="diagnosis",
                   options={"classes": ["malignant", "benign"]})
    assert t.fields["y"].tolist() == [0, 1, 0] and t.columns["y"] == ["malignant", "benign"]
    plain = load_table("csv", path=str(p), id_column="id", label_column="diagnosis")
    assert plain.fields["y"].tolist() == [1, 0, 1] and plain.columns["y"] == ["benign", "malignant"]
    with pytest.raises(DataError) as e:
        load_table("csv", path=str(p), id_column="id", label_column="diagnosis", options={"classes": ["benign"]})
    assert f"{p}, line 2, column 'diagnosis': label 'malignant' is not one of the classes ['benign']" in str(e.value)
    with pytest.raises(DataError, match="classes must be a non-empty list of label values as strings"):
        load_table("csv", path=str(p), id_column="id", label_column="diagnosis", options={"classes": [0, 1]})
    s = load_table("csv", path=str(p), id_column="id", label_column="diagnosis", options={"standardize": True})
    assert s.fields["x"][:, 0].tolist() == [1, 3, 5]
    with pytest.raises(DataError, match="standardize must be true or false"):
        load_table("csv", path=str(p), id_column="id", label_column="diagnosis", options={"standardize": 1})


def test_csv_non_numeric_cell(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("id,age\nP1,40\nP2,abc\n")
    with pytest.raises(DataError) as e:
        load_table("csv", path=str(p), id_column="id")
    assert f"{p}, line 3, column 'age': 'abc' is not a finite number" in str(e.value)


# -- Parquet -------------------------------------------------------------------------------------

def _clinic(tmp_path):
    ids = ["P0161", "0161", "P0007", "Q12"]
    age, bp, label = [50.5, 30, 41, 66], [120, 110, 130, 125], ["sick", "well", "sick", "unsure"]
    csv = tmp_path / "clinic.csv"
    csv.write_text("patient,age,bp,diagnosis\n" + "".join(f"{i},{a},{b},{d}\n" for i, a, b, d in
                                                          zip(ids, age, bp, label)))
    parquet = tmp_path / "clinic.parquet"
    pq.write_table(pa.table({"patient": ids, "age": age, "bp": pa.array(bp, pa.int32()), "diagnosis": label}),
                   parquet)
    return csv, parquet


@pytest.mark.parametrize("options", [{}, {"classes": ["well", "unsure", "sick"], "standardize": True}])
def test_parquet_equals_csv(tmp_path, options):
    csv, parquet = _clinic(tmp_path)
    kw = {"id_column": "patient", "label_column": "diagnosis", "options": options}
    a, b = load_table("csv", path=str(csv), **kw), load_table("parquet", path=str(parquet), **kw)
    assert b.ids.dtype.kind == "U" and b.ids.tolist() == a.ids.tolist() == ["P0161", "0161", "P0007", "Q12"]
    assert b.fields["x"].dtype == np.float32 and np.array_equal(a.fields["x"], b.fields["x"])
    assert b.fields["x"][0].tolist() == [50.5, 120] and b.columns == a.columns
    assert np.array_equal(a.fields["y"], b.fields["y"])
    expected = [2, 0, 2, 1] if options else [0, 2, 0, 1]
    assert b.fields["y"].tolist() == expected


def test_parquet_integer_ids_and_labels(tmp_path):
    p = tmp_path / "t.pq"
    pq.write_table(pa.table({"id": [7, 3], "f": [1.0, 2.0], "y": [1, 0], "code": ["161", "162"]}), p)
    t = load_table("parquet", path=str(p), id_column="id", label_column="y", options={})
    assert t.ids.dtype == np.int64 and t.ids.tolist() == [7, 3] and t.fields["y"].tolist() == [1, 0]
    assert t.columns["x"] == ["f", "code"] and t.fields["x"].tolist() == [[1, 161], [2, 162]]  # numeric text parsed
    by_code = load_table("parquet", path=str(p), id_column="code")
    assert by_code.ids.dtype == np.int64 and by_code.ids.tolist() == [161, 162]


def test_parquet_errors_name_file_row_and_column(tmp_path):
    p = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "age": ["40", "41", "abc"]}), p)
    with pytest.raises(DataError) as e:
        load_table("parquet", path=str(p), id_column="id")
    assert f"{p}, row 2, column 'age': 'abc' is not a finite number" in str(e.value)
    pq.write_table(pa.table({"id": ["a", "b", "c"], "age": [40.0, None, 3.0]}), p)
    with pytest.raises(DataError, match=r"bad.parquet, row 1, column 'age': empty \(null\)"):
        load_table("parquet", path=str(p), id_column="id")
    pq.write_table(pa.table({"id": ["a", "b"], "age": [40.0, float("inf")]}), p)
    with pytest.raises(DataError, match=r"bad.parquet, row 1, column 'age': inf is not a finite number"):
        load_table("parquet", path=str(p), id_column="id")
    pq.write_table(pa.table({"id": ["a", "b"], "tags": [[1], [2]]}), p)
    with pytest.raises(DataError, match=r"row 0, column 'tags': \[1\] is not a number"):
        load_table("parquet", path=str(p), id_column="id")
    with pytest.raises(DataError, match=r"bad.parquet: no column 'pid'; columns are \['id', 'tags'\]"):
        load_table("parquet", path=str(p), id_column="pid")
    pq.write_table(pa.table({"id": ["a", "a"], "f": [1, 2], "y": ["x", "z"]}), p)
    with pytest.raises(DataError, match=r"not unique \(repeated: \['a'\]\)"):
        load_table("parquet", path=str(p), id_column="id")
    p.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="bad.parquet: not a readable Parquet file"):
        load_table("parquet", path=str(p), id_column="id")
    with pytest.raises(DataError, match="no such file"):
        load_table("parquet", path=str(tmp_path / "none.parquet"), id_column="id")


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    _, parquet = _clinic(tmp_path)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now fails
    with pytest.raises(DataError, match=r"reading Parquet needs pyarrow: pip install 'splitlearn\[parquet\]'"):
        load_table("parquet", path=str(parquet), id_column="patient")


# -- npz -----------------------------------------------------------------------------------------

def test_npz_ids_and_is_test(tmp_path):
    p = tmp_path / "d.npz"
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    np.savez(p, ids=np.array(["s1", "s2", "s3", "s4"]), x=x, y=np.array([1, 0, 1, 2], dtype=np.int32),
             is_test=np.array([0, 0, 1, 0], dtype=np.int8), image=np.zeros((4, 1, 2, 2), np.float32))
    t = load_table("npz", path=p.name, base_dir=tmp_path)
    assert t.ids.tolist() == ["s1", "s2", "s3", "s4"] and "ids" not in t.fields
    assert t.fields["x"].dtype == np.float32 and np.array_equal(t.fields["x"], x)
    assert t.fields["y"].dtype == np.int64 and t.fields["y"].tolist() == [1, 0, 1, 2]
    assert t.fields["image"].shape == (4, 1, 2, 2) and t.fields["is_test"].tolist() == [0, 0, 1, 0]
    train, test = train_test_split_ids(t.ids, 0.5, 0, t.fields["is_test"])
    assert train.tolist() == ["s1", "s2", "s4"] and test.tolist() == ["s3"]
    np.savez(p, patient=np.array([9, 4]), x=np.ones((2, 2)))
    assert load_table("npz", path=str(p), id_column="patient").ids.tolist() == [9, 4]
    plain = load_table("npz", path=str(p))  # no 'ids' array: 0..n-1, and patient is a field
    assert plain.ids.tolist() == [0, 1] and plain.fields["patient"].tolist() == [9, 4]


def test_npz_refusals(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.ones((3, 2)), notes=np.array(["a", None, 3], dtype=object))
    with pytest.raises(DataError) as e:
        load_table("npz", path=str(p))
    assert f"{p}: array 'notes' holds Python objects" in str(e.value)
    np.savez(p, x=np.ones((3, 2)), y=np.ones(2))
    with pytest.raises(DataError, match=r"d.npz: array 'y' has 2 rows but array 'x' has 3"):
        load_table("npz", path=str(p))
    np.savez(p, ids=np.array([1, 1]), x=np.ones((2, 2)))
    with pytest.raises(DataError, match=r"d.npz: ids in array 'ids' are not unique \(repeated: \[1\]\)"):
        load_table("npz", path=str(p))
    np.savez(p, ids=np.array([0.5, 1.5]), x=np.ones((2, 2)))
    with pytest.raises(DataError, match="d.npz: array 'ids': ids must be integers or strings"):
        load_table("npz", path=str(p))
    p.write_bytes(p.read_bytes()[:60])
    with pytest.raises(DataError, match="d.npz: .*cannot be read"):
        load_table("npz", path=str(p))
    p.write_bytes(b"not an archive")
    with pytest.raises(DataError, match="d.npz: not an .npz archive"):
        load_table("npz", path=str(p))
    with pytest.raises(DataError, match=r"does not use \['label_column'\]"):
        load_table("npz", path=str(p), label_column="y")


# -- images --------------------------------------------------------------------------------------

def _digit_folder(root, per_class=4):
    """Class folders '0', '1', '2' of 8x8 grey PNGs made from sklearn's digits; returns the pixels by id."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = {}
    for c in range(3):
        (root / str(c)).mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(d.target == c)[:per_class]):
            arr = (d.images[i] * 255 / 16).round().astype(np.uint8)
            Image.fromarray(arr, "L").save(root / str(c) / f"img{k}.png")
            pixels[f"{c}/img{k}.png"] = arr
    (root / "1" / "notes.txt").write_text("not an image")
    (root / "2" / ".hidden.png").write_bytes(b"junk")
    return pixels


def test_image_folder(tmp_path):
    pixels = _digit_folder(tmp_path / "digits")
    t = load_table("images", path=str(tmp_path / "digits"))
    assert len(t) == 12 and t.ids.dtype.kind == "U" and t.ids.tolist()[:2] == ["0/img0.png", "0/img1.png"]
    assert t.fields["y"].dtype == np.int64 and t.fields["y"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert t.columns["y"] == ["0", "1", "2"]
    image = t.fields["image"]
    assert image.shape == (12, 1, 8, 8) and image.dtype == np.float32 and t.fields["x"].shape == (12, 64)
    expected = np.stack([pixels[i] for i in t.ids.tolist()]).astype(np.float32) / np.float32(255)
    assert np.array_equal(image[:, 0], expected) and np.array_equal(t.fields["x"], image.reshape(12, 64))
    (tmp_path / "digits" / "3").mkdir()  # an empty class folder is fine, ordered by classes
    t = load_table("images", path=str(tmp_path / "digits"), options={"classes": ["2", "3", "0", "1"]})
    assert t.columns["y"] == ["2", "3", "0", "1"] and t.fields["y"].tolist() == [0] * 4 + [2] * 4 + [3] * 4
    label = dict(zip(t.ids.tolist(), t.fields["y"].tolist()))
    assert label["0/img0.png"] == 2 and label["1/img3.png"] == 3 and label["2/img0.png"] == 0
    with pytest.raises(DataError, match=r"subfolder\(s\) \['3'\] are not among the classes"):
        load_table("images", path=str(tmp_path / "digits"), options={"classes": ["0", "1", "2"]})


def test_image_size_and_channels(tmp_path):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(root / "a" / "one.png")
    Image.fromarray(rgb[::-1].copy(), "RGB").save(root / "a" / "two.bmp")
    t = load_table("images", path=str(root), options={"channels": 3})
    assert t.fields["image"].shape == (2, 3, 10, 12) and t.fields["x"].shape == (2, 360)
    assert np.array_equal(t.fields["image"][0], rgb.transpose(2, 0, 1).astype(np.float32) / np.float32(255))
    grey = load_table("images", path=str(root))
    want = np.asarray(Image.fromarray(rgb, "RGB").convert("L"), dtype=np.float32) / np.float32(255)
    assert grey.fields["image"].shape == (2, 1, 10, 12) and np.array_equal(grey.fields["image"][0, 0], want)
    small = load_table("images", path=str(root), options={"size": [5, 4], "channels": 3, "normalize": True})
    want = np.asarray(Image.fromarray(rgb, "RGB").resize((4, 5), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    assert small.fields["image"].shape == (2, 3, 5, 4)
    assert np.allclose(small.fields["image"][0], want.transpose(2, 0, 1))
    Image.fromarray(rgb[:6], "RGB").save(root / "a" / "three.png")
    with pytest.raises(DataError) as e:
        load_table("images", path=str(root))
    assert f"{root / 'a' / 'three.png'}: 6x12 pixels (height x width), but {root / 'a' / 'one.png'} is 10x12" \
        in str(e.value) and "size = [H, W]" in str(e.value)
    assert load_table("images", path=str(root), options={"size": [6, 6]}).fields["image"].shape == (3, 1, 6, 6)


@pytest.mark.parametrize("options,msg", [
    ({"size": [8]}, "size must be [H, W]"),
    ({"channels": 2}, "channels must be 1 (grey) or 3 (RGB)"),
    ({"normalize": {"mean": [0.5], "std": [0.2]}, "channels": 3}, "3 value(s) each"),
    ({"normalize": "yes"}, "normalize must be true, false or"),
    ({"resize": [8, 8]}, "unknown option(s) ['resize'] for dataset 'images'; allowed: ['channels', 'classes'"),
])
def test_image_options_checked(tmp_path, options, msg):
    _digit_folder(tmp_path / "d", per_class=1)
    with pytest.raises(DataError) as e:
        load_table("images", path=str(tmp_path / "d"), options=options)
    assert msg in str(e.value)


def test_image_csv(tmp_path):
    pixels = _digit_folder(tmp_path / "scans", per_class=2)
    (tmp_path / "index.csv").write_text("patient,image,label,site\n"
                                        "P0161,scans/2/img1.png,lesion,a\nP0002,scans/0/img0.png,clear,b\n"
                                        "P0003,./scans/1/img0.png,lesion,c\n")
    t = load_table("images", path="index.csv", id_column="patient", base_dir=tmp_path, options={"channels": 3})
    assert t.ids.tolist() == ["P0161", "P0002", "P0003"] and t.fields["y"].tolist() == [1, 0, 1]
    assert t.columns["y"] == ["clear", "lesion"] and t.fields["image"].shape == (3, 3, 8, 8)
    assert np.array_equal(t.fields["image"][0, 2], pixels["2/img1.png"].astype(np.float32) / np.float32(255))
    (tmp_path / "paths.csv").write_text("file,kind\nscans/0/img1.png,0\nscans/2/img0.png,1\n")
    u = load_table("images", path=str(tmp_path / "paths.csv"), label_column="kind",
                   options={"image_column": "file", "classes": ["1", "0"]})
    assert u.ids.tolist() == ["scans/0/img1.png", "scans/2/img0.png"] and u.fields["y"].tolist() == [1, 0]
    assert u.columns["y"] == ["1", "0"]
    (tmp_path / "nolabel.csv").write_text("image\nscans/0/img1.png\n")
    assert "y" not in load_table("images", path=str(tmp_path / "nolabel.csv")).fields


@pytest.mark.parametrize("cell", ["../outside.png", "scans/../../outside.png", "/etc/passwd"])
def test_image_csv_path_escaping_refused(tmp_path, cell):
    _digit_folder(tmp_path / "data" / "scans", per_class=1)
    (tmp_path / "outside.png").write_bytes((tmp_path / "data" / "scans" / "0" / "img0.png").read_bytes())
    (tmp_path / "data" / "index.csv").write_text(f"image,label\nscans/0/img0.png,0\n{cell},1\n")
    with pytest.raises(DataError) as e:
        load_table("images", path=str(tmp_path / "data" / "index.csv"))
    assert f"index.csv, line 3, column 'image': image path {cell!r} leaves the CSV's folder" in str(e.value)


def test_unreadable_images_are_named(tmp_path):
    root = tmp_path / "imgs"
    _digit_folder(root, per_class=1)
    good = (root / "0" / "img0.png").read_bytes()
    (root / "1" / "img0.png").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(DataError) as e:
        load_table("images", path=str(root))
    assert f"{root / '1' / 'img0.png'}: not a readable image" in str(e.value)
    (root / "1" / "img0.png").write_bytes(b"this is text, not a PNG")
    with pytest.raises(DataError, match=r"1/img0.png: not a readable image"):
        load_table("images", path=str(root))
    (root / "index.csv").write_text("image\n0/img0.png\n0/missing.png\n")
    with pytest.raises(DataError) as e:
        load_table("images", path=str(root / "index.csv"))
    assert f"{root / '0' / 'missing.png'} (line 3 of {root / 'index.csv'}): not a readable image" in str(e.value)
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty: no images .* in its subfolders \['a'\]"):
        load_table("images", path=str(empty))
    with pytest.raises(DataError, match=r"does not use \['id_column'\]"):
        load_table("images", path=str(root), id_column="patient")


# -- infer_dataset -------------------------------------------------------------------------------

def test_infer_dataset(tmp_path):
    for name, kind in [("a.csv", "csv"), ("b.parquet", "parquet"), ("c.PQ", "parquet"), ("d.npz", "npz")]:
        (tmp_path / name).write_bytes(b"")
        assert infer_dataset(tmp_path / name) == kind
    _digit_folder(tmp_path / "imgs", per_class=1)
    assert infer_dataset(tmp_path / "imgs") == "images"
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    assert infer_dataset(tmp_path / "mnist") == "mnist"
    (tmp_path / "e.xlsx").write_bytes(b"")
    with pytest.raises(DataError, match=r"e.xlsx: cannot tell the format"):
        infer_dataset(tmp_path / "e.xlsx")
    (tmp_path / "plain" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match=r"plain: a folder with neither MNIST idx files nor subfolders of images"):
        infer_dataset(tmp_path / "plain")
    with pytest.raises(DataError, match=r"nothing.csv: no such file or folder"):
        infer_dataset(tmp_path / "nothing.csv")
