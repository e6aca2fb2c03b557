"""Text data (``dataset = "text"``): notes tokenised at their owner with the ``tokenizers`` package, batches
padded to their own longest note (:class:`~splitlearn.data.text.Ragged`), and the causal language-model loss
with its per-token figures (loss, perplexity, next-token accuracy)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import splitlearn
from splitlearn.core.dryrun import check_labels
from splitlearn.core.graph import Node
from splitlearn.core.load import load_plan
from splitlearn.core.losses import causal_lm
from splitlearn.core.losses import get as loss_kind
from splitlearn.core.metrics import evaluation_metrics, token_scores
from splitlearn.core.specs import PlanError
from splitlearn.data import DataError, load_table
from splitlearn.data.text import IGNORE_INDEX, Ragged
from splitlearn.run.rows import party_inputs
from splitlearn.run.setup import prepare

WORDS = "the patient has a cough fever and pain today chest mild severe"
NOTES = [("n1", "has a cough", "flu"), ("n2", "fever and chest pain today", "cold"), ("n3", "mild cough", "flu")]


def _tokenizer(path, specials=("<pad>", "[UNK]", "<s>", "</s>")):
    """A WordLevel tokenizer trained on WORDS, wrapping every note as ``<s> ... </s>`` (a pair: ``<s> A B </s>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([WORDS], trainers.WordLevelTrainer(special_tokens=list(specials)))
    if "<s>" in specials:
        s, e = tok.token_to_id("<s>"), tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A $B </s>",
                                                           special_tokens=[("<s>", s), ("</s>", e)])
    tok.save(str(path))
    return tok.get_vocab()


@pytest.fixture
def corpus(tmp_path):
    vocab = _tokenizer(tmp_path / "tokenizer.json")
    with open(tmp_path / "notes.csv", "w") as f:
        f.write("id,text,diagnosis\n" + "".join(f'{i},"{t}",{d}\n' for i, t, d in NOTES))
    with open(tmp_path / "notes.jsonl", "w") as f:
        f.write("".join(json.dumps({"id": k, "prompt": "the patient", "note": t}) + "\n"
                        for k, (_, t, _) in enumerate(NOTES, 7)))
    return tmp_path, vocab


def _ids(vocab, text):
    return [vocab["<s>"], *[vocab[w] for w in text.split()], vocab["</s>"]]


def test_a_csv_of_notes_gives_padded_token_ids_masks_and_labels(corpus):
    folder, vocab = corpus
    t = load_table("text", path="notes.csv", id_column="id", label_column="diagnosis", base_dir=folder,
                   options={"tokenizer": "tokenizer.json", "max_length": 8, "classes": ["flu", "cold"]})
    assert t.ids.tolist() == ["n1", "n2", "n3"] and t.fields["y"].tolist() == [0, 1, 0]
    pad = vocab["<pad>"]
    for row, (_, text, _) in enumerate(NOTES):
        ids = _ids(vocab, text)
        n = len(ids)
        assert t.fields["input_ids"][row].tolist() == ids + [pad] * (8 - n)
        assert t.fields["attention_mask"][row].tolist() == [1] * n + [0] * (8 - n)
        # no prompt: labels from the text's first token (<s>, a special token put first, is left out) to </s>
        assert t.fields["lm_labels"][row].tolist() == [IGNORE_INDEX] + ids[1:] + [IGNORE_INDEX] * (8 - n)
    assert {k: (v.dtype, v.shape) for k, v in t.fields.items() if k != "y"} == \
        {k: (np.dtype("int64"), (3, 8)) for k in ("input_ids", "attention_mask", "lm_labels")}


def test_a_prompt_is_tokenised_first_and_left_out_of_the_labels(corpus):
    """JSONL: ``<s> the patient | has a cough </s>``: <s> and the prompt's two tokens are -100, the text and the
    end token it ends with are labels; the tokenizer folder (holding tokenizer.json) is accepted."""
    folder, vocab = corpus
    t = load_table("text", path=str(folder / "notes.jsonl"), id_column="id",
                   options={"tokenizer": str(folder), "max_length": 9, "prompt_column": "prompt",
                            "text_column": "note"})
    assert t.ids.tolist() == [7, 8, 9] and "y" not in t.fields
    ids = t.fields["input_ids"][0].tolist()
    text = [vocab[w] for w in "has a cough".split()]
    assert ids == [vocab["<s>"], vocab["the"], vocab["patient"], *text, vocab["</s>"], vocab["<pad>"], vocab["<pad>"]]
    assert t.fields["lm_labels"][0].tolist() == [-100, -100, -100, *text, vocab["</s>"], -100, -100]
    assert t.fields["attention_mask"][1].tolist() == [1] * 9  # 2 + 2 + 5 tokens: exactly max_length


def test_a_note_longer_than_max_length_is_refused_by_id_or_truncated(corpus):
    folder, vocab = corpus
    opts = {"tokenizer": "tokenizer.json", "max_length": 6}
    with pytest.raises(DataError, match=r"line 3: note 'n2': 7 tokens, more than max_length = 6; raise max_length "
                                        r"or set truncate = true"):
        load_table("text", path="notes.csv", id_column="id", base_dir=folder, options=opts)
    t = load_table("text", path="notes.csv", id_column="id", base_dir=folder, options={**opts, "truncate": True})
    assert t.fields["input_ids"][1].tolist() == _ids(vocab, NOTES[1][1])[:6]  # the last token (</s>) dropped
    assert t.fields["lm_labels"][1].tolist() == [-100] + _ids(vocab, NOTES[1][1])[1:6]
    with pytest.raises(DataError, match=r"its prompt takes 3 of the max_length = 3 tokens"):
        load_table("text", path=str(folder / "notes.jsonl"), id_column="id",
                   options={"tokenizer": str(folder), "max_length": 3, "prompt_column": "prompt",
                            "text_column": "note", "truncate": True})


def test_refusals_name_the_file_and_what_to_change(corpus):
    folder, _ = corpus
    csv = dict(path="notes.csv", id_column="id", base_dir=folder)
    opts = {"tokenizer": "tokenizer.json", "max_length": 8}
    with pytest.raises(DataError, match=r"missing\.json: no such file; the text option tokenizer names"):
        load_table("text", **csv, options={**opts, "tokenizer": "missing.json"})
    with pytest.raises(DataError, match=r"no column 'body'; columns are \['id', 'text', 'diagnosis'\]"):
        load_table("text", **csv, options={**opts, "text_column": "body"})
    with pytest.raises(DataError, match=r"needs options.max_length"):
        load_table("text", **csv, options={"tokenizer": "tokenizer.json"})
    with pytest.raises(DataError, match=r"max_length must be an integer of at least 2"):
        load_table("text", **csv, options={**opts, "max_length": 1})
    with pytest.raises(DataError, match=r"unknown option\(s\) \['standardize'\]"):
        load_table("text", **csv, options={**opts, "standardize": True})
    with pytest.raises(DataError, match=r"pad_token '<nope>' is not a token"):
        load_table("text", **csv, options={**opts, "pad_token": "<nope>"})
    (folder / "bad.jsonl").write_text('{"id": 1, "text": "mild cough"}\n\n{"id": 2, "text": "cough"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: not valid JSON"):
        load_table("text", path="bad.jsonl", id_column="id", base_dir=folder, options=opts)
    (folder / "bad.jsonl").write_text('{"id": 1, "text": "mild cough"}\n{"id": 2, "note": "cough"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: no field 'text'; this line has \['id', 'note'\]"):
        load_table("text", path="bad.jsonl", id_column="id", base_dir=folder, options=opts)
    (folder / "bad.jsonl").write_text('{"id": 1, "text": 5}\n')
    with pytest.raises(DataError, match=r"line 1, field 'text': the text must be a string, got 5"):
        load_table("text", path="bad.jsonl", id_column="id", base_dir=folder, options=opts)
    (folder / "empty.csv").write_text('id,text\na,""\n')
    with pytest.raises(DataError, match=r"line 2: note 'a': its text gives no tokens"):
        load_table("text", path="empty.csv", id_column="id", base_dir=folder, options=opts)


def test_a_tokenizer_without_a_padding_token_needs_pad_token(corpus):
    folder, _ = corpus
    vocab = _tokenizer(folder / "nopad.json", specials=("[UNK]", "<eos>"))
    opts = {"tokenizer": "nopad.json", "max_length": 8}
    with pytest.raises(DataError, match=r"nopad\.json: the tokenizer sets no padding token and its vocabulary holds "
                                        r"none of \['<pad>', '\[PAD\]', '<\|pad\|>'\]; set the text option pad_token"):
        load_table("text", path="notes.csv", id_column="id", base_dir=folder, options=opts)
    t = load_table("text", path="notes.csv", id_column="id", base_dir=folder, options={**opts, "pad_token": "<eos>"})
    assert t.fields["input_ids"][0].tolist()[3:] == [vocab["<eos>"]] * 5  # 3 tokens, then the pad token's id


def test_ragged_rows_come_padded_to_their_own_longest():
    values = torch.tensor([[1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 8, 0]])
    r = Ragged(values, torch.tensor([3, 5]))
    assert r[torch.tensor([0, 1])].shape == (2, 5) and r[np.array([1, 0])][1].tolist() == [1, 2, 3, 0, 0]
    assert r[torch.tensor([0])].tolist() == [[1, 2, 3]] and r[:1].tolist() == [[1, 2, 3]]
    assert r[1].tolist() == [4, 5, 6, 7, 8] and len(r) == 2 and r.shape == (2, 6) and not r.is_floating_point()
    with pytest.raises(ValueError, match="lengths must lie in 0..6"):
        Ragged(values, torch.tensor([3, 7]))


class Embed(nn.Module):
    """Token ids and mask [B, T] -> (hidden [B, T, 6], 0 on padding); the widths it is given are kept in WIDTHS."""

    def __init__(self, vocab: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, 6)

    def forward(self, ids, mask):
        assert ids.shape == mask.shape  # cut alike
        WIDTHS.append(ids.shape[1])
        return (self.emb(ids) * mask.unsqueeze(-1),)


class Mid(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, h):
        return (torch.tanh(self.lin(h)),)


WIDTHS: list[int] = []


def _lm_plan(folder, vocab: int, max_length: int = 8, **data) -> dict:
    """U-shaped: the hospital embeds its notes and computes the language-model loss; the server runs the middle."""
    vary = [{"name": "h", "vary": {1: max_length}}]
    return {
        "name": "notes", "train": {"epochs": 1, "batch_size": 4, "seed": 1},
        "data": {"dataset": "text", "path": str(folder / "notes.csv"), "id_column": "id", "test_fraction": 0.25,
                 "options": {"tokenizer": str(folder / "tokenizer.json"), "max_length": max_length}, **data},
        "parties": {"hospital": {"holds": {"ids": "input_ids", "mask": "attention_mask", "labels": "lm_labels"},
                                 "optimizer": {"name": "sgd", "lr": 0.5}},
                    "server": {"optimizer": {"name": "sgd", "lr": 0.5}}},
        "networks": {"embed": Embed(vocab), "mid": Mid(), "head": nn.Linear(6, vocab)},
        "segments": {"bottom": {"party": "hospital", "inputs": ["hospital.ids", "hospital.mask"],
                                "network": "embed", "merge": "module", "outputs": vary},
                     "middle": {"party": "server", "inputs": ["bottom:h"], "network": "mid", "outputs": vary},
                     "top": {"party": "hospital", "inputs": ["middle:h"], "network": "head"}},
        "losses": {"lm": {"input": "top", "target": "hospital.labels", "kind": "causal_lm"}},
    }


def test_split_training_reads_each_batch_at_its_own_width_and_scores_per_token(tmp_path):
    """Notes of 2 to 7 tokens: every step's ids, mask and labels are cut alike to the batch's longest note; the
    test figures are the trained model's token mean loss over the test rows, its exp and next-token accuracy."""
    vocab = _tokenizer(tmp_path / "tokenizer.json")
    words = WORDS.split()
    notes = [" ".join(words[(3 * i) % 9:(3 * i) % 9 + 1 + i % 5]) for i in range(12)]
    (tmp_path / "notes.csv").write_text("id,text\n" + "".join(f"{i},{t}\n" for i, t in enumerate(notes)))
    plan = load_plan(_lm_plan(tmp_path, len(vocab)))
    _, setups, _ = prepare(plan)
    inputs, splits = setups["hospital"].inputs, setups["hospital"].splits
    assert all(isinstance(inputs[f"hospital.{k}"], Ragged) for k in ("ids", "mask", "labels"))
    rows = torch.from_numpy(splits.test)
    lengths = inputs["hospital.mask"].lengths[rows]
    assert {inputs[f"hospital.{k}"][rows].shape[1] for k in ("ids", "mask", "labels")} == {int(lengths.max())}
    WIDTHS.clear()
    result = splitlearn.train(plan)
    assert len(set(WIDTHS)) > 1 and max(WIDTHS) <= 8  # batches of several widths, none past max_length
    m = result["metrics"]
    mods = result.modules
    ids, labels = inputs["hospital.ids"][rows], inputs["hospital.labels"][rows]
    with torch.no_grad():
        hidden = mods["hospital"]["bottom"](ids, inputs["hospital.mask"][rows])[0]
        logits = mods["hospital"]["top"](mods["server"]["middle"](hidden)[0])
    counted = labels[:, 1:] != -100
    nll = nn.functional.cross_entropy(logits[:, :-1][counted].double(), labels[:, 1:][counted], reduction="sum")
    pe = {k: v[-1] for k, v in m["per_epoch"].items()}  # the one epoch's test figures
    assert pe["test_tokens"] == int(counted.sum()) and pe["test_rows"] == len(rows) == m["test_rows"]
    assert pe["test_loss"] == pytest.approx(float(nll) / int(counted.sum()), abs=1e-6)
    assert pe["test_perplexity"] == pytest.approx(math.exp(pe["test_loss"]), rel=1e-9)
    right = (logits[:, :-1].argmax(-1) == labels[:, 1:])[counted]
    assert pe["test_accuracy"] == m["test_accuracy"] == int(right.sum()) / int(counted.sum())
    assert "test_roc_auc" not in m and "ci95" not in m


def test_token_labels_travel_to_the_server_with_their_minus_100(tmp_path):
    """Vanilla: the server computes the loss on the hospital's lm_labels, which hold -100 (before the text, on
    padding); the label wire's check takes them as the loss leaves them out (notes of one length: a label wire's
    width is fixed)."""
    vocab = _tokenizer(tmp_path / "tokenizer.json")
    words = WORDS.split()
    notes = [" ".join(words[i % 10:i % 10 + 3]) for i in range(8)]
    (tmp_path / "notes.csv").write_text("id,text\n" + "".join(f"{i},{t}\n" for i, t in enumerate(notes)))
    plan = _lm_plan(tmp_path, len(vocab), max_length=5)
    plan["segments"] = {"bottom": plan["segments"]["bottom"],
                        "top": {"party": "server", "inputs": ["bottom:h"], "network": "head"}}
    plan["networks"].pop("mid")
    result = splitlearn.train(load_plan(plan))
    assert [w["carries"] for w in result["wires"]] == ["activation", "label"]
    assert result["metrics"]["per_epoch"]["test_tokens"] == [2 * 4]  # 2 test notes, 4 labels after <s> each


def test_the_text_fields_take_no_column_range(corpus):
    folder, vocab = corpus
    plan = _lm_plan(folder, len(vocab))
    plan["parties"]["hospital"]["holds"]["ids"] = {"field": "input_ids", "columns": [0, 4]}
    plan = load_plan(plan)
    table = load_table("text", path=str(folder / "notes.csv"), id_column="id",
                       options={"tokenizer": str(folder / "tokenizer.json"), "max_length": 8})
    with pytest.raises(PlanError, match="'input_ids' of 'hospital' holds tokens.*takes no column range"):
        party_inputs(plan, "hospital", table)


def test_causal_lm_equals_hugging_faces_llama_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:], mask[2, 6:] = 0, 0
    ids[mask == 0] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = -100  # a prompt
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    ours = causal_lm(out.logits, labels)
    assert abs(float(ours) - float(out.loss)) <= 1e-6 and float(out.loss) > 1.0
    assert float(causal_lm(out.logits, torch.full_like(labels, -100))) == 0.0  # nothing counted: 0, not NaN
    with pytest.raises(ValueError, match=r"causal_lm takes logits \[batch, tokens, vocabulary\]"):
        causal_lm(out.logits[:, 0], labels)


def test_perplexity_and_accuracy_are_over_every_counted_token():
    """Two batches (V = 2): batch 1 counts 2 tokens (NLL ln 4/3, right; ln 4, wrong), its second row none;
    batch 2 counts 1 (ln 4/3, right). Token mean (2 ln 4/3 + ln 4) / 3, not the mean of the batches' means."""
    l3 = math.log(3)
    a = torch.tensor([[[0.0, l3], [l3, 0.0], [0.0, 0.0]], [[l3, 0.0], [0.0, l3], [0.0, 0.0]]])
    b = torch.tensor([[[l3, 0.0], [0.0, 0.0]]])
    parts = [token_scores(a, torch.tensor([[0, 1, 1], [0, -100, -100]]), 2),
             token_scores(b, torch.tensor([[1, 0]]), 1)]
    m = evaluation_metrics("causal_lm", parts)
    loss = (2 * math.log(4 / 3) + math.log(4)) / 3
    assert m == pytest.approx({"test_loss": loss, "test_perplexity": (64 / 9) ** (1 / 3), "test_accuracy": 2 / 3,
                               "test_rows": 3, "test_tokens": 3}, rel=1e-6)  # (float32 logits)
    assert loss_kind("causal_lm").correct(a, torch.tensor([[0, 1, 1], [0, -100, -100]])) == 1


def test_label_checks_take_minus_100_for_a_language_model_only():
    node = Node("lm", "hospital", "loss", ("top", "hospital.labels"))
    labels = Ragged(torch.tensor([[4, 9, -100], [-100, 3, -100]]), torch.tensor([2, 2]))
    check_labels(node, labels, 10, -100)  # -100 and the padding are left out
    with pytest.raises(PlanError, match=r"take values -100\.\.9, but the head 'top' gives 10 classes"):
        check_labels(node, labels, 10)
    with pytest.raises(PlanError, match=r"take values -5\.\.9"):
        check_labels(node, torch.tensor([[4, 9, -5]]), 10, -100)
    with pytest.raises(PlanError, match=r"take values 3\.\.10"):
        check_labels(node, torch.tensor([[3, 10, -100]]), 10, -100)
