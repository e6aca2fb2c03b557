"""Images a user already has, read with Pillow: a folder of class subfolders, or a CSV of image paths.

Either gives ``image`` (n, C, H, W) float32 in [0, 1] (pixel / 255), ``x`` the same flattened and,
with labels, ``y`` (int64, class names in ``columns["y"]``). Every problem is a DataError naming
the file (the CSV line, the image).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from .files import check_classes, check_unique, csv_records, header_index, label_indices, text_ids
from .table import DataError, Table

__all__ = ["read_images", "IMAGE_SUFFIXES", "check_normalize"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"})


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading images needs Pillow: pip install pillow") from None
    return Image


def _check_size(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size)):
        raise DataError(f"images option size must be [H, W], two positive integers, got {size!r}")
    return int(size[0]), int(size[1])


def _check_channels(channels: Any) -> int:
    if channels not in (1, 3) or isinstance(channels, bool):
        raise DataError(f"images option channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    return int(channels)


def check_normalize(normalize: Any, channels: Any = None, dataset: str = "images") -> None:
    """Option ``normalize``: true or false, or ``{mean = [...], std = [...]}`` with one value per channel
    (std above 0; ``channels`` None: any one count). Only checked here: it is applied later, fitted on
    the training rows (:mod:`splitlearn.data.preprocess`)."""
    if channels is not None:
        channels = _check_channels(channels)
    if isinstance(normalize, bool):
        return
    ok = isinstance(normalize, dict) and set(normalize) == {"mean", "std"}
    if ok:
        mean, std = normalize["mean"], normalize["std"]
        ok = all(isinstance(v, (list, tuple)) and v and len(v) == len(mean) and all(
            isinstance(a, (int, float)) and not isinstance(a, bool) and np.isfinite(a) for a in v) for v in (mean, std))
        ok = ok and all(s > 0 for s in std) and (channels is None or len(mean) == channels)
    if not ok:
        count = f"{channels} value(s)" if channels is not None else "the same number of values"
        raise DataError(f"{dataset} option normalize must be true, false or {{mean = [...], std = [...]}} with "
                        f"{count} each (one per channel), std above 0; got {normalize!r}")


def _image(Image: Any, file: Path, mode: str, size: tuple[int, int] | None, named: str = "") -> np.ndarray:
    """One image as uint8 (C, H, W)."""
    try:
        with Image.open(file) as im:
            if im.mode in ("I", "F") or im.mode.startswith("I;"):
                raise DataError(f"{file}{named}: a 16-bit or floating-point image (mode {im.mode}); only 8-bit "
                                "images are read: convert them to 8-bit")
            im = im.convert(mode)
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        # UnidentifiedImageError and truncated files are OSErrors
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise DataError(f"{file}{named}: not a readable image ({reason})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _pixels(files: list[Path], size: tuple[int, int] | None, channels: int, named: list[str]) -> np.ndarray:
    """The images as float32 (n, C, H, W) in [0, 1]; without ``size`` they must all have the first one's size."""
    Image = _pil()
    mode = "L" if channels == 1 else "RGB"
    out: np.ndarray | None = None
    for i, file in enumerate(files):
        arr = _image(Image, file, mode, size, named[i])
        if out is None:
            out = np.empty((len(files), *arr.shape), dtype=np.float32)
        elif arr.shape != out.shape[1:]:
            (h, w), (h0, w0) = arr.shape[1:], out.shape[2:]
            raise DataError(f"{file}{named[i]}: {h}x{w} pixels (height x width), but {files[0]} is {h0}x{w0}; "
                            "images must have one size: set option size = [H, W] to resize them")
        out[i] = arr
    assert out is not None
    out /= np.float32(255.0)
    return out


def _hidden(p: Path) -> bool:
    return p.name.startswith(".")


def _folder(path: Path, classes: list[str] | None) -> tuple[list[Path], list[str], np.ndarray, list[str]]:
    """(files, ids, labels, class names) of a folder with one subfolder per class."""
    try:
        subs = sorted(p.name for p in path.iterdir() if p.is_dir() and not _hidden(p))
        if classes is None:
            classes = subs
        else:
            extra, absent = sorted(set(subs) - set(classes)), [c for c in classes if c not in subs]
            if extra:
                raise DataError(f"{path}: subfolder(s) {extra} are not among the classes {classes}; "
                                "add them to option classes or move them out")
            if absent:
                raise DataError(f"{path}: no subfolder for class(es) {absent}; create an empty one for a "
                                "class of which this data has no images")
        files, ids, labels = [], [], []
        for k, c in enumerate(classes):
            found = sorted(f for f in (path / c).iterdir()
                           if f.suffix.lower() in IMAGE_SUFFIXES and not _hidden(f) and f.is_file())
            files += found
            ids += [f"{c}/{f.name}" for f in found]
            labels += [k] * len(found)
    except OSError as e:
        raise DataError(f"{path}: cannot read the folder ({e.strerror or e})") from None
    if not files:
        raise DataError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its subfolders "
                        f"{classes}; give a folder with one subfolder of images per class")
    return files, ids, np.asarray(labels, dtype=np.int64), list(classes)


def _escapes(rel: str) -> bool:
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        return True
    return os.path.normpath(rel.replace("\\", "/")).split(os.sep)[0] == ".."


def _listed(path: Path, id_column: str | None, label_column: str | None, image_column: str,
            classes: list[str] | None) -> tuple[list[Path], list[str], np.ndarray, list[str] | None, np.ndarray | None]:
    """(files, where, ids, class names, labels) of a CSV of image paths relative to its folder."""
    if label_column is not None and label_column == id_column:
        raise DataError(f"{path}: label_column and id_column are both {id_column!r}")
    records = csv_records(path)
    header = next(records)[1]
    image_at = header_index(path, header, image_column)
    id_at = header_index(path, header, id_column)
    if label_column is None and "label" in header and id_column != "label":
        label_column = "label"
    label_at = header_index(path, header, label_column)
    folder = path.parent
    files, lines, rels, id_text, labels = [], [], [], [], []
    for line, row in records:
        rel = row[image_at].strip()
        if not rel:
            raise DataError(f"{path}, line {line}, column {image_column!r}: no image path")
        if _escapes(rel):
            raise DataError(f"{path}, line {line}, column {image_column!r}: image path {rel!r} leaves the CSV's "
                            f"folder {folder}; give paths relative to it, inside it")
        files.append(folder / rel.replace("\\", "/"))
        lines.append(line)
        rels.append(rel)
        if id_at is not None:
            id_text.append(row[id_at])
        if label_at is not None:
            labels.append(row[label_at].strip())
    if not files:
        raise DataError(f"{path}: no rows after the header")
    if id_at is not None:
        ids = text_ids(id_text, lambda i: f"{path}, line {lines[i]}, column {id_column!r}")
    else:
        ids = np.asarray(rels, dtype=str)
    check_unique(path, ids, id_column or image_column)
    where = [f" (line {line} of {path})" for line in lines]
    if label_at is None:
        return files, where, ids, None, None
    y, names = label_indices(labels, classes, lambda i: f"{path}, line {lines[i]}, column {label_column!r}")
    return files, where, ids, names, y


def read_images(path: Path, id_column: str | None = None, label_column: str | None = None, *,
                image_column: str | None = None, size: Any = None, channels: Any = 1,
                classes: list[str] | None = None) -> Table:
    """Images from ``path``: a folder with one subfolder per class, or a CSV of image paths.

    A folder: classes are the sorted subfolder names (or ``classes``, in that order); its image files
    (.png .jpg .jpeg .bmp .gif .tif .tiff, sorted, hidden ones skipped) are the rows, ids ``"class/file"``.
    A CSV: ``image_column`` (default ``image``) holds paths relative to the CSV's folder (never leaving
    it), ``id_column`` the ids (default the image path), ``label_column`` the labels (default ``label``
    if present). ``size = [H, W]`` resizes (bilinear); ``channels`` 1 (grey) or 3 (RGB).
    """
    size, channels = _check_size(size), _check_channels(channels)
    classes = check_classes(classes, "images")
    if image_column is not None and (not isinstance(image_column, str) or not image_column):
        raise DataError(f"images option image_column must be a column name, got {image_column!r}")
    if path.is_dir():
        unused = [k for k, v in {"id_column": id_column, "label_column": label_column,
                                 "option image_column": image_column}.items() if v]
        if unused:
            raise DataError(f"{path}: a folder of class subfolders does not use {unused} (they are for a CSV "
                            "of image paths); remove them")
        files, ids, y, names = _folder(path, classes)
        where = [""] * len(files)
    elif path.is_file():
        files, where, ids, names, y = _listed(path, id_column, label_column, image_column or "image", classes)
    else:
        raise DataError(f"{path}: no such file or folder")
    image = _pixels(files, size, channels, where)
    fields, columns = {"image": image, "x": image.reshape(len(files), -1)}, {}
    if y is not None:
        fields["y"] = y
        if names is not None:
            columns["y"] = names
    return Table(ids, fields, columns)
