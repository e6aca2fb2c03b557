"""Notes as tokens: ``dataset = "text"``, a CSV or JSONL file of notes tokenised at the data owner, and
:class:`Ragged`, the variable-length rows a step reads.

A text table holds ``input_ids`` (int64, ``[N, max_length]``, right-padded with the pad id),
``attention_mask`` (int64, 1 on tokens, 0 on padding), ``lm_labels`` (int64: the token ids from the text's
first token on, :data:`IGNORE_INDEX` before it and on padding) and ``y`` (class labels, or regression values)
when a label column is given. With ``prompt_column`` each note is tokenised as the pair (prompt, text), prompt
first, one sequence: every token before the text's first one (the prompt, and special tokens the tokenizer puts
first) is left out of ``lm_labels``; the text and what the tokenizer appends after it (an end token) are kept.

The tokenizer is read with the ``tokenizers`` package (``Tokenizer.from_file``: JSON, nothing unpickled); its
own padding and truncation settings are switched off, padding and the ``max_length`` rule are applied here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .files import add_labels, check_table_settings, check_target, check_unique, csv_records, header_index, text_ids
from .table import DataError, Table

__all__ = ["Ragged", "read_text", "load_tokenizer", "pad_id", "text_lengths", "TEXT_FIELDS", "TEXT_OPTIONS",
           "PAD_TOKENS", "IGNORE_INDEX"]

TEXT_FIELDS = ("input_ids", "attention_mask", "lm_labels")  # a party's fields that trim alike, by the mask
TEXT_OPTIONS = ("text_column", "prompt_column", "tokenizer", "max_length", "truncate", "pad_token", "classes")
PAD_TOKENS = ("<pad>", "[PAD]", "<|pad|>")  # looked for, in this order, when the tokenizer sets no padding
IGNORE_INDEX = -100  # a label left out of the loss (prompt, padding), as torch's and Hugging Face's


class Ragged:
    """Rows of variable length right-padded to one width: row ``i`` is ``values[i, :lengths[i]]``. Indexed like
    a tensor (a step's positions, ``[:1]``) it gives those rows padded only to their own longest (a new,
    contiguous tensor); one row (an integer) comes unpadded. The engine reads text fields through it, as it
    reads a torch dataset's :class:`~splitlearn.data.torchdata.TorchField`."""

    def __init__(self, values: torch.Tensor, lengths: torch.Tensor):
        if values.dim() < 2 or lengths.dim() != 1 or len(lengths) != len(values):
            raise ValueError(f"Ragged needs values [rows, width, ...] and one length per row; got values "
                             f"{list(values.shape)} and lengths {list(lengths.shape)}")
        if len(lengths) and (int(lengths.min()) < 0 or int(lengths.max()) > values.shape[1]):
            raise ValueError(f"Ragged lengths must lie in 0..{values.shape[1]} (the width)")
        self.values, self.lengths = values, lengths.to(torch.int64)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def shape(self) -> torch.Size:
        """The padded shape of every row: ``[rows, width, ...]``."""
        return self.values.shape

    def __len__(self) -> int:
        return len(self.values)

    def is_floating_point(self) -> bool:
        return self.values.is_floating_point()

    def numel(self) -> int:
        return self.values.numel()

    def __getitem__(self, rows: Any) -> torch.Tensor:
        if isinstance(rows, np.ndarray):
            rows = torch.from_numpy(rows)
        values, lengths = self.values[rows], self.lengths[rows]
        if values.dim() < self.values.dim():  # one row
            return values[:int(lengths)].contiguous()
        width = int(lengths.max()) if len(lengths) else 0
        return values[:, :width].contiguous()

    def __repr__(self) -> str:
        return f"Ragged(rows={len(self)}, width={self.values.shape[1]}, dtype={self.dtype})"


def text_lengths(table: Table) -> np.ndarray | None:
    """Each row's token count, from the table's ``attention_mask`` field (int64) where it holds one as an array
    (else None): 0 and 1 only, each row's ones first (right padding), at least one token a row; a DataError
    names the first row that is not so."""
    mask = table.fields.get("attention_mask")
    if not isinstance(mask, np.ndarray):
        return None
    if mask.ndim != 2 or mask.dtype.kind not in "biu":
        raise DataError(f"field 'attention_mask' is {mask.dtype} with shape {list(mask.shape[1:])} per row, but it "
                        "gives each row's token count: integers 0 and 1, one per position")
    lengths = mask.sum(1, dtype=np.int64)
    expected = np.arange(mask.shape[1])[None, :] < lengths[:, None]
    bad = np.flatnonzero((mask != expected).any(1) | (lengths < 1))
    if len(bad):
        row = mask[bad[0]]
        what = "has no token" if lengths[bad[0]] < 1 else f"is {row.tolist()[:12]}{'...' if len(row) > 12 else ''}"
        raise DataError(f"the attention mask of id {table.ids[bad[0]].item()!r} {what}: each row must be 1 on its "
                        "tokens then 0 on padding (right padding), with at least one token")
    return lengths


def load_tokenizer(path: Path) -> Any:
    """A ``tokenizers.Tokenizer`` from ``path``: a ``tokenizer.json`` file, or a model folder holding one."""
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"{file}: no such file; the text option tokenizer names a tokenizer.json file or a model "
                        "folder holding one (relative to the plan's folder)")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataError("dataset 'text' tokenises with the tokenizers package, which is not installed: "
                        "pip install tokenizers") from None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a plain Exception for a file it cannot parse
        raise DataError(f"{file}: not a tokenizer the tokenizers package can read ({e})") from None


def pad_id(tokenizer: Any, pad_token: str | None, where: Path) -> int:
    """The id of ``pad_token`` (it must be in the vocabulary), else of the tokenizer's padding token, else of the
    first of :data:`PAD_TOKENS` in its vocabulary; a DataError naming ``where`` (the tokenizer file) if none."""
    if pad_token is not None:
        if not isinstance(pad_token, str) or tokenizer.token_to_id(pad_token) is None:
            raise DataError(f"{where}: text option pad_token {pad_token!r} is not a token of this tokenizer's "
                            "vocabulary; name one of its tokens (e.g. its end-of-text token)")
        return int(tokenizer.token_to_id(pad_token))
    padding = tokenizer.padding
    if padding and padding.get("pad_token") is not None and tokenizer.token_to_id(padding["pad_token"]) is not None:
        return int(tokenizer.token_to_id(padding["pad_token"]))
    for token in PAD_TOKENS:
        if tokenizer.token_to_id(token) is not None:
            return int(tokenizer.token_to_id(token))
    raise DataError(f"{where}: the tokenizer sets no padding token and its vocabulary holds none of "
                    f"{list(PAD_TOKENS)}; set the text option pad_token to one of its tokens (e.g. its end-of-text "
                    "token: padding is masked out, so any token will do)")


def _options(options: dict[str, Any], id_column: str | None, label_column: str | None) -> dict[str, Any]:
    """The text options, checked: column names, ``max_length`` (required, >= 2), ``truncate``, ``tokenizer``."""
    text, prompt = options.get("text_column", "text"), options.get("prompt_column")
    for name, value in (("text_column", text), ("prompt_column", prompt)):
        if value is not None and (not isinstance(value, str) or not value):
            raise DataError(f"text option {name} must be a column name, got {value!r}")
    named = [("id_column", id_column), ("label_column", label_column), ("text_column", text),
             ("prompt_column", prompt)]
    for i, (a, x) in enumerate(named):
        for b, y in named[i + 1:]:
            if x is not None and x == y:
                raise DataError(f"text settings {a} and {b} are both {x!r}: each names a column of its own")
    if "max_length" not in options:
        raise DataError("dataset 'text' needs options.max_length: the most tokens a note may take (e.g. 512)")
    most = options["max_length"]
    if isinstance(most, bool) or not isinstance(most, (int, np.integer)) or most < 2:
        raise DataError(f"text option max_length must be an integer of at least 2 (the most tokens a note may "
                        f"take), got {most!r}")
    truncate = options.get("truncate", False)
    if not isinstance(truncate, bool):
        raise DataError(f"text option truncate must be true or false, got {truncate!r}")
    tokenizer = options.get("tokenizer")
    if not isinstance(tokenizer, str) or not tokenizer:
        raise DataError("dataset 'text' needs options.tokenizer: a tokenizer.json file or a model folder holding "
                        f"one, relative to the plan's folder (got {tokenizer!r})")
    return {"text": text, "prompt": prompt, "max_length": int(most), "truncate": truncate, "tokenizer": tokenizer}


def _json_cell(value: Any, where: str, what: str, text: bool) -> str:
    if text:
        if not isinstance(value, str):
            raise DataError(f"{where}: {what} must be a string, got {json.dumps(value)[:80]}")
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: {what} must be a string or a number, got {json.dumps(value)[:80]}")
    return str(value)


def _notes(path: Path, columns: dict[str, str | None]) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line, {role: cell})`` per note of a CSV or JSONL file, roles ``id``, ``text`` and (where named)
    ``prompt``, ``label``; every cell as read (text unstripped)."""
    wanted = {role: name for role, name in columns.items() if name is not None}
    if path.suffix.lower() == ".csv":
        records = csv_records(path)
        header = next(records)[1]
        at = {role: header_index(path, header, name) for role, name in wanted.items()}
        for line, row in records:
            yield line, {role: row[i] for role, i in at.items()}
        return
    try:
        with open(path, encoding="utf-8-sig") as f:
            for line, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, line {line}: not valid JSON ({e.msg}, column {e.colno}); a JSONL "
                                    "file holds one JSON object per line") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}, line {line}: a JSON {type(record).__name__}, not an object; a JSONL "
                                    "file holds one JSON object per line")
                cells = {}
                for role, name in wanted.items():
                    if name not in record:
                        raise DataError(f"{path}, line {line}: no field {name!r}; this line has {sorted(record)}")
                    cells[role] = _json_cell(record[name], f"{path}, line {line}, field {name!r}", f"the {role}",
                                             role in ("text", "prompt"))
                yield line, cells
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a readable UTF-8 file ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _tokens(tokenizer: Any, cells: dict[str, str], most: int, truncate: bool,
            where: str) -> tuple[list[int], int]:
    """A note's token ids and the position of its text's first token (the labels start there)."""
    prompted = "prompt" in cells
    enc = tokenizer.encode(cells["prompt"], cells["text"]) if prompted else tokenizer.encode(cells["text"])
    ids, seq = enc.ids, enc.sequence_ids
    text_seq = 1 if prompted else 0
    first = next((i for i, s in enumerate(seq) if s == text_seq), None)
    if first is None:
        raise DataError(f"{where}: its text gives no tokens; every note needs text")
    if len(ids) > most:
        if not truncate:
            raise DataError(f"{where}: {len(ids)} tokens, more than max_length = {most}; raise max_length or set "
                            "truncate = true (the note's last tokens are then dropped)")
        if first >= most:
            raise DataError(f"{where}: its prompt takes {first} of the max_length = {most} tokens, so truncating "
                            "would leave none of its text; raise max_length or shorten the prompt")
        ids = ids[:most]
    return ids, first


def read_text(path: Path, id_column: str | None, label_column: str | None, options: dict[str, Any],
              base_dir: Path | None = None, classes: list[str] | None = None, target: str = "class") -> Table:
    """Notes of a CSV (``.csv``) or JSONL (``.jsonl``, ``.ndjson``: one JSON object per line) file, tokenised:
    the fields of this module's docstring. ``options``: :data:`TEXT_OPTIONS` (``classes`` given apart, checked);
    the tokenizer's path is relative to ``base_dir`` (the plan's folder). Ids and labels are read as the CSV
    reader reads them (:func:`~splitlearn.data.files.read_csv`)."""
    opts = _options(options, id_column, label_column)
    classes = check_table_settings(path, "a text file", id_column, label_column, classes, "text")
    check_target(target, classes, "text")
    if path.suffix.lower() not in (".csv", ".jsonl", ".ndjson"):
        raise DataError(f"{path}: a text dataset is a .csv file or a .jsonl file (one JSON object per line)")
    file = Path(opts["tokenizer"]).expanduser()
    if base_dir is not None and not file.is_absolute():
        file = Path(base_dir) / file
    file = file.resolve()
    tokenizer = load_tokenizer(file)
    pad = pad_id(tokenizer, options.get("pad_token"), file)
    tokenizer.no_padding()  # padding and length are this reader's, whatever the file sets
    tokenizer.no_truncation()
    most = opts["max_length"]
    columns = {"id": id_column, "text": opts["text"], "prompt": opts["prompt"], "label": label_column}
    lines, ids, labels, encoded = [], [], [], []
    for line, cells in _notes(path, columns):
        lines.append(line)
        ids.append(cells["id"])
        if label_column is not None:
            labels.append(cells["label"].strip())
        encoded.append((line, cells))
    if not ids:
        raise DataError(f"{path}: no notes")
    ids_arr = text_ids(ids, lambda i: f"{path}, line {lines[i]}, column {id_column!r}")
    check_unique(path, ids_arr, id_column)
    n = len(ids)
    input_ids = np.full((n, most), pad, dtype=np.int64)
    mask = np.zeros((n, most), dtype=np.int64)
    lm_labels = np.full((n, most), IGNORE_INDEX, dtype=np.int64)
    for i, (line, cells) in enumerate(encoded):
        tokens, first = _tokens(tokenizer, cells, most, opts["truncate"],
                                f"{path}, line {line}: note {ids_arr[i].item()!r}")
        input_ids[i, :len(tokens)] = tokens
        mask[i, :len(tokens)] = 1
        lm_labels[i, first:len(tokens)] = tokens[first:]
    fields = {"input_ids": input_ids, "attention_mask": mask, "lm_labels": lm_labels}
    table_columns: dict[str, list[str]] = {}
    if label_column is not None:
        add_labels(fields, table_columns, labels, classes,
                   lambda i: f"{path}, line {lines[i]}, column {label_column!r}", target)
    return Table(ids_arr, fields, table_columns)
