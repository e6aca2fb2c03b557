"""The clinical notes example (examples/notes/make_notes.py) writes its corpus, tokenizer and base model."""

import csv
import json
import importlib.util
import math
import re

import pytest
import torch
from tokenizers import Tokenizer
from typer.testing import CliRunner
from transformers import LlamaForCausalLM

from splitlearn.cli import app

from .conftest import EXAMPLES


def _script():
    spec = importlib.util.spec_from_file_location("make_notes", EXAMPLES / "notes" / "make_notes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


notes = _script()


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("notes")
    return out, notes.main(["--small", "--out", str(out)])


def test_the_script_writes_the_corpus_and_the_model_folder(made):
    out, summary = made
    assert sorted(p.name for p in (out / "model").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    rows, aux = _rows(out / "notes.csv"), _rows(out / "notes_aux.csv")
    assert list(rows[0]) == ["id", "text", "diagnosis", "prompt"] == list(aux[0])
    assert (len(rows), len(aux)) == (300, 150)
    assert [r["id"] for r in rows[:2]] == ["note-00000", "note-00001"] and aux[0]["id"] == "aux-00000"
    for table in (rows, aux):
        counts = [sum(r["diagnosis"] == y for r in table) for y in ("pneumonia", "heart_failure", "diabetes", "copd")]
        assert sum(counts) == len(table) and max(counts) - min(counts) <= 1, counts
        assert all(r["prompt"] == f"write the clinical note of a patient with {r['diagnosis'].replace('_', ' ')}."
                   for r in table)
        assert all(1 <= r["text"].count(".") <= 4 for r in table)
    texts = [r["text"] for r in rows]
    assert len(set(texts)) == 300 and not set(texts) & {r["text"] for r in aux}  # unique notes, a disjoint aux set
    assert summary["rows"] == {"pneumonia": 75, "heart_failure": 75, "diabetes": 75, "copd": 75}
    assert rows == notes.make_corpus(300, 150, 0)[0]  # the file is the seeded corpus


def test_the_corpus_is_the_same_for_the_same_seed():
    first = notes.make_corpus(60, 30, 7)
    assert notes.make_corpus(60, 30, 7) == first
    assert notes.make_corpus(60, 30, 8)[0] != first[0]


def test_the_tokenizer_gives_a_note_back(made):
    out, summary = made
    tok = Tokenizer.from_file(str(out / "model" / "tokenizer.json"))
    assert [tok.token_to_id(t) for t in ("<pad>", "<unk>", "<s>", "</s>")] == [0, 1, 2, 3]
    assert tok.get_vocab_size() == summary["vocab"]
    for r in _rows(out / "notes.csv"):
        enc = tok.encode(r["text"])
        assert (enc.ids[0], enc.ids[-1]) == (2, 3) and 1 not in enc.ids
        assert tok.decode(enc.ids) == r["text"]
    pair = tok.encode("write the clinical note of a patient with copd.", "examination shows a barrel shaped chest.")
    assert pair.type_ids == [0] * 11 + [1] * 8  # <s> and the prompt's 10 tokens, then the note's 7 and </s>
    padded = tok.encode_batch(["no rash.", "examination shows no rash."])
    assert padded[0].ids[-2:] == [0, 0] and padded[0].attention_mask == [1] * 5 + [0] * 2


def test_the_saved_base_model_loads_and_has_learnt_the_notes(made):
    out, summary = made
    model = LlamaForCausalLM.from_pretrained(out / "model")
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.max_position_embeddings, c.tie_word_embeddings) == (32, 64, 4, 4, 2, 256, False)
    assert (c.vocab_size, c.pad_token_id, c.bos_token_id, c.eos_token_id) == (summary["vocab"], 0, 2, 3)
    tok = Tokenizer.from_file(str(out / "model" / "tokenizer.json"))
    held = notes.batch(tok, [r["text"] for r in _rows(out / "notes_aux.csv")])  # one batch: a mean over its tokens
    torch.manual_seed(0)
    fresh = LlamaForCausalLM(c)
    with torch.no_grad():
        after, before = (float(m.eval()(**held).loss) for m in (model, fresh))
    assert after == pytest.approx(summary["loss_after"], abs=1e-4)
    assert before == pytest.approx(summary["loss_before"], abs=1e-4)
    assert abs(before - math.log(c.vocab_size)) < 0.3  # a random model guesses about uniformly
    assert after < 0.6 * before, (before, after)  # 40 steps of the base training at least: 5.7 -> 2.7 here


def test_the_script_refuses_too_few_rows(capsys):
    with pytest.raises(SystemExit):
        notes.main(["--rows", "5"])
    assert "--rows must be at least 16" in capsys.readouterr().err


# -- the example's plans, at the reduced size: U-shaped LoRA fine-tuning, over party processes, resumed -------------

def _plan(made, name, **train):
    """The example plan ``name`` (classify, lm) next to the small corpus and model, with ``train`` entries."""
    import shutil
    import tomllib

    from splitlearn.core.load import load_plan

    out, _ = made
    shutil.copy(EXAMPLES / "notes" / f"{name}.toml", out / f"{name}.toml")
    plan = load_plan(out / f"{name}.toml")
    with open(out / f"{name}.toml", "rb") as f:
        assert tomllib.load(f)["networks"]["lm"]["hf"]["folder"] == "model"  # read from next to the plan
    return plan.with_train(**train) if train else plan


def test_the_classification_plan_learns_the_diagnoses_and_the_server_sees_no_label(made, tmp_path):
    import splitlearn

    result = splitlearn.train(_plan(made, "classify", epochs=8), out=tmp_path / "run")
    m = result["metrics"]
    assert m["test_rows"] == 60 and m["test_accuracy"] > 0.45  # 4 balanced diagnoses: chance is 0.25
    wires = {w["name"]: w for w in result["wires"]}
    assert sorted(wires) == ["bottom:hidden->middle", "bottom:mask->middle", "middle:hidden->top"]
    assert all(w["carries"] == "activation" for w in wires.values())  # no label wire: the diagnoses stay home
    saved = {p: sorted(mod.state_dict()) for p, mods in result.modules.items() for mod in mods.values()}
    assert all("lora_" in k or k == "score.weight" for keys in saved.values() for k in keys)  # adapters + new head
    from splitlearn.core.specs import PlanError

    with pytest.raises(PlanError, match="has no language-model head"):  # a classifier decodes no text
        splitlearn.generate(tmp_path / "run", "a note", max_new_tokens=2)


def test_the_language_model_plan_over_party_processes_equals_threads_and_generates(made, tmp_path):
    import splitlearn

    from .support import same_run

    plan = _plan(made, "lm", epochs=1)
    result = splitlearn.train(plan, out=tmp_path / "threads")
    splitlearn.train(plan, launcher="processes", out=tmp_path / "processes")
    same_run(tmp_path / "threads", tmp_path / "processes")
    r = json.loads((tmp_path / "processes" / "result.json").read_text())["metrics"]
    assert r["per_epoch"]["test_perplexity"][-1] < made[1]["vocab"] / 4  # far below a uniform guess
    # generation across the party processes (gRPC, mutual TLS), each with its own piece: as in threads, and as
    # the unsplit trained model decodes
    prompt = "write the clinical note of a patient with copd."
    out = splitlearn.generate(tmp_path / "processes", prompt, max_new_tokens=20, stop=False, launcher="processes")
    assert out["launcher"] == "processes" and len(out["tokens"]) == 20 and out["text"] and out["tokens_per_second"] > 0
    threads = splitlearn.generate(tmp_path / "threads", prompt, max_new_tokens=20, stop=False)
    assert threads["tokens"] == out["tokens"]
    r = CliRunner().invoke(app, ["generate", str(tmp_path / "threads"), "--prompt", prompt, "--max-new-tokens", "20"])
    said = " ".join(r.output.split())  # (the console wraps long lines at its width)
    crossed = re.search(r"tokens/s; bytes per token over each wire: bottom:hidden->middle: (\d+) B", said)
    assert r.exit_code == 0 and crossed and 32 * 4 < int(crossed.group(1)) < 32 * 4 + 128
    r = CliRunner().invoke(app, ["generate", str(tmp_path / "threads"), "--prompt", prompt, "--launcher", "ray"])
    assert r.exit_code == 2 and "launcher 'ray': choose threads or processes" in r.output
    ids, model = out["prompt_tokens"], result.model.eval()
    with torch.no_grad():  # the unsplit model's greedy choice, position after position (the end-of-text token too)
        for _ in range(20):
            ids = ids + [int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())]
    assert out["tokens"] == ids[len(out["prompt_tokens"]):]
    hidden = out["bytes_per_token"]["bottom:hidden->middle"]  # the small model's hidden size, float32, and framing
    assert 32 * 4 < hidden < 32 * 4 + 128 and 32 * 4 < out["bytes_per_token"]["middle:hidden->top"] < 32 * 4 + 128
    logs = [(tmp_path / "processes" / "generation" / "parties" / p / "party.log").read_text() for p in plan.parties]
    assert not any(prompt in log for log in logs)


def test_the_language_model_plan_resumes_bit_identical(made, tmp_path):
    """Stopped in epoch 2, resumed from the end of epoch 1: it ends as the uninterrupted run, to the bit (the FLOP
    counter's dispatch mode rounds a softmax's backward its own way: a resumed run counts where the first did)."""
    import splitlearn

    from .support import same_run, stop_after

    plan = _plan(made, "lm", epochs=2)
    splitlearn.train(plan, out=tmp_path / "whole")
    with pytest.raises(Exception, match="stopped after 11 steps"):
        splitlearn.train(plan, out=tmp_path / "stopped", on_step=stop_after(11))
    splitlearn.train(plan, out=tmp_path / "stopped", resume=True)
    same_run(tmp_path / "whole", tmp_path / "stopped")


def test_a_vanilla_language_model_sends_its_labels_of_varying_length_and_predict_points_to_generate(made, tmp_path):
    """The hospital runs the bottom, the server the rest and the loss: the next tokens travel to it on a label wire
    whose length varies per batch (up to max_length); predict refuses a language model's head, naming generate."""
    import splitlearn
    from splitlearn.core.load import load_plan
    from splitlearn.core.specs import PlanError

    out, summary = made
    text = (EXAMPLES / "notes" / "lm.toml").read_text()
    head = text[:text.index("[segments.bottom]")]
    (out / "vanilla_lm.toml").write_text(head + """
[segments.bottom]
party = "hospital"
network = "lm"
inputs = ["hospital.input_ids", "hospital.attention_mask"]
merge = "module"
cut = "model.layers.1"
outputs = [{ name = "hidden", vary = { 1 = 96 } }, { name = "mask", vary = { 1 = 96 } }]

[segments.top]
party = "server"
network = "lm"
inputs = ["bottom"]

[losses.next_token]
input = "top"
target = "hospital.labels"
kind = "causal_lm"
""")
    result = splitlearn.train(load_plan(out / "vanilla_lm.toml").with_train(epochs=1), out=tmp_path / "run")
    wire = next(w for w in result["wires"] if w["carries"] == "label")
    assert wire["name"] == "hospital.labels->next_token" and wire["dst"] == "server"
    assert result["metrics"]["test_perplexity"] < summary["vocab"] / 4 and result["metrics"]["test_tokens"] > 0
    per_token = {w["name"]: w["bytes_per_token"] for w in result["wires"]}  # over the real tokens the hospital counted
    assert per_token["bottom:hidden->top"]["forward"] >= 32 * 4 <= per_token["bottom:hidden->top"]["backward"]
    assert "backward" not in per_token["bottom:mask->top"]  # an integer element: no gradient
    counted = result["parties"]["hospital"]
    assert 0 < counted["tokens_backward"] < counted["tokens_forward"] and "tokens_forward" not in result["parties"][
        "server"]
    with pytest.raises(PlanError, match="language model's.*scores next tokens") as e:
        splitlearn.predict(tmp_path / "run")
    assert "splitlearn generate" in e.value.hint
    with pytest.raises(PlanError, match="head \\(segment 'top'\\) is at 'server'"):  # the next token: at the server
        splitlearn.generate(tmp_path / "run", "a note", max_new_tokens=2)
    with pytest.raises(PlanError, match="mean over tokens, and pipeline = 2") as e:  # micro-batches weigh by rows
        splitlearn.build_graph(load_plan(out / "vanilla_lm.toml").with_train(pipeline=2))
    assert e.value.entry == "train.pipeline"
