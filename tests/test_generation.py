"""Split generation as a run of the engine (splitlearn.generate): each party decodes with its own trained piece
and a key/value cache, the prompt and the tokens stay with the text's owner, what crosses goes over the plan's
wires; greedy decoding equals the unsplit model's token for token; plans that cannot generate are refused."""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed")
pytest.importorskip("peft", reason="the peft package (transformers extra) is not installed")

import splitlearn  # noqa: E402
from splitlearn.core.load import load_plan  # noqa: E402
from splitlearn.core.specs import DataSpec, PlanError  # noqa: E402
from splitlearn.launch.generating import generation_result, plan_generation  # noqa: E402
from splitlearn.models.generation import CachedPiece, Watch, greedy  # noqa: E402
from splitlearn.models.hfload import piece_of  # noqa: E402
from splitlearn.run.report import PartyReport  # noqa: E402

V, T, BOUND, H = 40, 8, 32, 16
FAMILIES = {
    "llama": (transformers.LlamaForCausalLM,
              lambda: transformers.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=4,
                                               num_attention_heads=2, num_key_value_heads=2, pad_token_id=0),
              ["model.layers.0", "model.layers.2"], ["q_proj", "v_proj"]),
    "gpt2": (transformers.GPT2LMHeadModel,
             lambda: transformers.GPT2Config(vocab_size=V, n_embd=H, n_layer=4, n_head=2, pad_token_id=0,
                                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
             ["transformer.h.0", "transformer.h.2"], ["c_attn"]),
}


def lm_plan(folder, cuts, targets, parties=("hospital", "server", "hospital"), bound=BOUND):
    """A language-model plan over arrays of token ids (16 rows, one training step): U-shaped by default."""
    g = np.random.default_rng(0)
    mask = (np.arange(T)[None] < g.integers(3, T + 1, 16)[:, None]).astype(np.int64)
    ids = g.integers(1, V, (16, T)) * mask
    labels = np.where(mask == 1, ids, -100)
    data = DataSpec.of_arrays({"input_ids": ids, "attention_mask": mask, "lm_labels": labels})
    out = [{"name": "hidden", "vary": {1: bound}}, {"name": "mask", "vary": {1: bound}}]
    names = ["bottom", "middle", "top"][:len(parties)]
    segments = {}
    for k, (seg, party) in enumerate(zip(names, parties)):
        inputs = (["hospital.input_ids", "hospital.attention_mask"] if k == 0 else
                  ["middle:hidden", "hospital.attention_mask"] if party == "hospital" else [names[k - 1]])
        segments[seg] = {"party": party, "inputs": inputs, "network": "lm",
                         "lora": {"r": 4, "alpha": 8, "target_modules": targets},
                         **({"merge": "module"} if len(inputs) > 1 else {}),
                         **({"cut": cuts[k], "outputs": out} if k < len(parties) - 1 else {})}
    return load_plan({
        "name": "gen", "data": data, "train": {"epochs": 1, "batch_size": 16, "seed": 0},
        "parties": {p: {"optimizer": {"name": "adamw", "lr": 1e-2},
                        **({"holds": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                                      "labels": "lm_labels"}} if p == "hospital" else {})}
                    for p in dict.fromkeys(parties)},
        "networks": {"lm": {"hf": {"folder": str(folder), "task": "causal_lm"}}},
        "segments": segments, "losses": {"next": {"input": names[-1], "target": "hospital.labels",
                                                  "kind": "causal_lm"}}})


def trained(tmp_path, family, **kw):
    cls, config, cuts, targets = FAMILIES[family]
    torch.manual_seed(0)
    cls(config()).save_pretrained(tmp_path / "model")
    plan = lm_plan(tmp_path / "model", cuts, targets, **kw)
    return splitlearn.train(plan, out=tmp_path / "run"), tmp_path / "run"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_split_generation_equals_the_trained_model_token_for_token(tmp_path, family):
    result, run = trained(tmp_path, family)
    prompt = [3, 17, 5, 29, 11]
    ids, model = list(prompt), result.model.eval()
    with torch.no_grad():  # the unsplit trained model's greedy choice, position after position, no cache
        for _ in range(20):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    want = ids[5:]
    got = splitlearn.generate(run, prompt, max_new_tokens=20, stop=False)
    assert got["tokens"] == want and len(set(want)) > 1
    wires = got["bytes_per_token"]
    assert sorted(wires) == ["bottom:hidden->middle", "bottom:mask->middle", "middle:hidden->top"]
    # a new token's hidden state: one position, float32, and its framing; the mask grows by 8 bytes a token
    assert H * 4 < wires["bottom:hidden->middle"] < H * 4 + 128
    assert got["tokens_per_second"] > 0 and got["text"] is None


def test_the_caches_follow_the_sequence_and_refuse_a_peer_that_does_not():
    cls, config, cuts, _ = FAMILIES["llama"]
    torch.manual_seed(0)
    model = cls(config()).eval()
    prompt = torch.tensor([[3, 17, 5]])
    first = greedy([piece_of(model, cuts, k) for k in range(3)], prompt, 2).tokens
    one = torch.ones(1, 3, dtype=torch.long)
    with torch.no_grad():
        pieces = [CachedPiece(piece_of(model, cuts, k), Watch(), starts=1, source="'server'") for k in range(3)]
        hidden, mask = pieces[0](prompt, one)
        hidden, _ = pieces[1](hidden, mask)
        assert int(pieces[2](hidden, mask)[0, -1].argmax()) == first[0]
        # a server that sends the whole sequence again (a new cache it would steer) or a position out of turn
        with pytest.raises(ValueError, match="'server' sent 4 new position\\(s\\) with a mask of 4; each step after "
                                             "the prompt carries exactly one, position 3"):
            pieces[2](torch.zeros(1, 4, H), torch.ones(1, 4, dtype=torch.long))
        with pytest.raises(ValueError, match="sent 1 new position\\(s\\) with a mask of 6.*position 3"):
            pieces[2](hidden[:, :1], torch.ones(1, 6, dtype=torch.long))
        with pytest.raises(ValueError, match="'server' sent 1 position\\(s\\) with a mask of 3 where a sequence "
                                             "begins"):  # a new token before any prompt
            CachedPiece(piece_of(model, cuts, 1), Watch(), source="'server'")(hidden[:, :1], mask)


def test_plans_that_cannot_generate_are_refused(tmp_path):
    cls, config, cuts, targets = FAMILIES["llama"]
    vanilla = lm_plan(tmp_path / "model", cuts, targets, parties=("hospital", "server"))  # the head at the server
    with pytest.raises(PlanError, match="head \\(segment 'middle'\\) is at 'server'.*prompt is at 'hospital'") as e:
        plan_generation(vanilla)
    assert "U-shaped" in e.value.hint
    u = lm_plan(tmp_path / "model", cuts, targets)
    assert plan_generation(u).limit == BOUND
    with pytest.raises(PlanError, match="reach 33 positions; the run's wires carry sequences of at most 32") as e:
        plan_generation(u).check(5, 29)
    assert "at most 28 new tokens" in e.value.hint
    with pytest.raises(PlanError, match="reach 16 positions; the model has 12 \\(n_positions\\)"):  # GPT-2's table
        plan_generation(u).check(5, 12, FAMILIES["gpt2"][1]().__class__(n_positions=12))
    fixed = u.replace(segments={**u.segments, "bottom": u.segments["bottom"].model_copy(
        update={"outputs": [o.model_copy(update={"vary": {}}) for o in u.segments["bottom"].outputs]})})
    with pytest.raises(PlanError, match="'bottom'.*do not vary in length"):
        plan_generation(fixed)


def test_the_result_stops_at_the_end_of_text_token_and_gathers_each_wire():
    owner = PartyReport("hospital", meter={"generation": {"tokens": [5, 2, 7, 2], "seconds": 0.5,
                                                          "bytes_per_token": {"bottom:hidden->middle": 200.0}}})
    server = PartyReport("server", meter={"generation": {"bytes_per_token": {"middle:hidden->top": 190.0}}})
    gen = plan_generation(lm_plan("model", FAMILIES["llama"][2], FAMILIES["llama"][3]))
    out = generation_result(gen, {"hospital": owner, "server": server}, stop_at=2)
    assert out["tokens"] == [5, 2] and out["tokens_per_second"] == 8.0  # 4 decoded in 0.5 s
    assert generation_result(gen, {"hospital": owner, "server": server}, stop_at=[7, 9])["tokens"] == [5, 2, 7]
    assert out["bytes_per_token"] == {"bottom:hidden->middle": 200.0, "middle:hidden->top": 190.0}
