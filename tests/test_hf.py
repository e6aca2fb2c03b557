"""Hugging Face transformers cut by name (splitlearn.models.hf): pieces compose to the model exactly, a party
holds only its own layers, split LoRA training equals unsplit peft training, split greedy decoding equals the
model's own."""

from itertools import islice

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed")
peft = pytest.importorskip("peft", reason="the peft package (transformers extra) is not installed")

from splitlearn.core.load import load_plan  # noqa: E402
from splitlearn.core.specs import DataSpec, PlanError  # noqa: E402
from splitlearn.launch.threads import run_local  # noqa: E402
from splitlearn.models import build_network, build_segment  # noqa: E402
from splitlearn.models.generation import greedy  # noqa: E402
from splitlearn.models.hf import HFError  # noqa: E402
from splitlearn.models.hfload import load_piece, piece_of  # noqa: E402
from splitlearn.models.lora import merge_lora  # noqa: E402
from splitlearn.run.setup import prepare, schedule  # noqa: E402

V, T = 50, 9


def llama(**extra):
    return transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                    num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, **extra)


def gpt2(**extra):
    return transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=4, n_head=2, pad_token_id=0, resid_pdrop=0.0,
                                   embd_pdrop=0.0, attn_pdrop=0.0, **extra)


def bert(**extra):
    return transformers.BertConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                   num_attention_heads=2, pad_token_id=0, **extra)


MODELS = {  # name: (model class, config, the two cuts of a U-shape)
    "llama_lm": (transformers.LlamaForCausalLM, llama, ["model.layers.0", "model.layers.2"]),
    "llama_cls": (transformers.LlamaForSequenceClassification, lambda: llama(num_labels=3), ["model.layers.1"]),
    "gpt2_lm": (transformers.GPT2LMHeadModel, gpt2, ["transformer.h.0", "transformer.h.2"]),
    "gpt2_cls": (transformers.GPT2ForSequenceClassification, lambda: gpt2(num_labels=3), ["transformer.h.1"]),
    "bert_cls": (transformers.BertForSequenceClassification, lambda: bert(num_labels=3),
                 ["bert.encoder.layer.0", "bert.encoder.layer.2"]),
}


def make(name, seed=0):
    cls, config, cuts = MODELS[name]
    torch.manual_seed(seed)
    return cls(config()).eval(), cuts


def batch(rows=4, seed=0):
    """Token ids right-padded (pad 0) to T with the attention mask: rows of lengths 3..T."""
    g = np.random.default_rng(seed)
    lengths = g.integers(3, T + 1, rows)
    lengths[0] = T
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int64)
    return torch.from_numpy(g.integers(1, V, (rows, T)) * mask), torch.from_numpy(mask)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_pieces_compose_to_the_model_exactly(name):
    model, cuts = make(name)
    ids, mask = batch()
    whole = model(input_ids=ids, attention_mask=mask).logits
    pieces = [piece_of(model, cuts, k) for k in range(len(cuts) + 1)]
    x = ids
    for p in pieces[:-1]:
        x, m = p(x, mask)
        assert x.shape == (4, T, 16) and m is mask  # what crosses: the hidden states and the padding mask
    assert torch.equal(pieces[-1](x, mask), whole)
    # each piece holds its own weights only: together exactly the model's, none twice
    names = [set(p.state_dict()) for p in pieces]
    assert sum(len(n) for n in names) == len(set().union(*names)) == len(model.state_dict())
    assert sum(t.numel() for p in pieces for t in p.state_dict().values()) == \
        sum(t.numel() for t in model.state_dict().values())  # (a tied weight: a copy in each piece using it)


def test_a_piece_reads_only_its_own_tensors_from_the_folder(tmp_path):
    model, cuts = make("llama_lm")
    model.save_pretrained(tmp_path)
    whole = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    held = []
    for k in range(3):
        piece = load_piece(tmp_path, "causal_lm", cuts, k)
        ref = piece_of(model, cuts, k)
        assert piece.state_dict().keys() == ref.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(piece.state_dict().values(), ref.state_dict().values()))
        held.append(sum(t.numel() * t.element_size() for t in piece.state_dict().values()))
    assert sum(held) == whole and max(held) < 0.5 * whole  # the middle party: 2 of 4 blocks, no embeddings/head
    ids, mask = batch()
    x = ids
    for k in range(3):  # rebuilt from the folder, the rotary tables (not saved) recomputed on each side
        x = load_piece(tmp_path, "causal_lm", cuts, k)(x, mask)
        x = x[0] if k < 2 else x
    assert torch.equal(x, model(input_ids=ids, attention_mask=mask).logits)


def test_cuts_that_cannot_be_made_are_refused(tmp_path):
    model, _ = make("llama_lm")
    with pytest.raises(HFError, match="names no block.*model.layers"):
        piece_of(model, ["model.embed_tokens"], 0)
    with pytest.raises(HFError, match="increasing order"):
        piece_of(model, ["model.layers.2", "model.layers.1"], 0)
    with pytest.raises(HFError, match="leaves no block to the last piece"):
        piece_of(model, ["model.layers.3"], 0)
    with pytest.raises(HFError, match="has 4 blocks"):
        piece_of(model, ["model.layers.7"], 0)
    with pytest.raises(HFError, match="no config.json"):
        load_piece(tmp_path, "causal_lm", ["model.layers.1"], 0)
    model.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(HFError, match="no model.safetensors.*never read"):
        load_piece(tmp_path, "causal_lm", ["model.layers.1"], 0)
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(HFError, match="not readable safetensors weights.*SafetensorError"):
        load_piece(tmp_path, "causal_lm", ["model.layers.1"], 0)


def u_plan(folder, *, lora=True, cuts=("model.layers.0", "model.layers.2"), task="classification", rows=48,
           parties=("hospital", "server", "hospital"), optimizer=None, targets=("q_proj", "v_proj")):
    """A U-shaped (or, with one cut, vanilla) plan over arrays of token ids, every segment with LoRA adapters."""
    g = np.random.default_rng(1)
    lengths = g.integers(3, T + 1, rows)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int64)
    ids = g.integers(1, V, (rows, T)) * mask
    data = DataSpec.of_arrays({"input_ids": ids, "attention_mask": mask, "y": (ids[:, 0] % 3).astype(np.int64)})
    adapters = {"lora": {"r": 4, "alpha": 8, "target_modules": list(targets)}} if lora else {}
    out = [{"name": "hidden", "vary": {1: T}}, {"name": "mask", "vary": {1: T}}]
    names = ["bottom", "middle", "top"][:len(cuts)] + ["top"]
    segments = {}
    for k, (seg, party) in enumerate(zip(names, parties)):
        inputs = (["hospital.input_ids", "hospital.attention_mask"] if k == 0 else
                  ["middle:hidden", "hospital.attention_mask"] if party == "hospital" and k == len(cuts) and k > 1
                  else [names[k - 1]])
        segments[seg] = {"party": party, "inputs": inputs, "network": "lm", **adapters,
                         **({"merge": "module"} if len(inputs) > 1 and k == 0 or "middle:hidden" in inputs else {}),
                         **({"cut": cuts[k], "outputs": out} if k < len(cuts) else {})}
    opt = optimizer or {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0}
    return load_plan({
        "name": "hf", "data": data, "train": {"epochs": 1, "batch_size": 16, "seed": 0},
        "parties": {p: {"optimizer": opt, **({"holds": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                                                         "y": "y"}} if p == "hospital" else {})}
                    for p in dict.fromkeys(parties)},
        "networks": {"lm": {"hf": {"folder": str(folder), "task": task}}},
        "segments": segments, "losses": {"task": {"input": "top", "target": "hospital.y"}}})


@pytest.mark.parametrize("name,cuts", [("llama_cls", ("model.layers.0", "model.layers.2")),
                                       ("gpt2_cls", ("transformer.h.0", "transformer.h.2")),
                                       ("llama_cls", ("model.layers.1",))])
def test_split_lora_training_equals_unsplit_peft_training(tmp_path, name, cuts):
    model, _ = make(name)
    model.save_pretrained(tmp_path)
    parties = ("hospital", "server", "hospital") if len(cuts) == 2 else ("hospital", "server")
    targets = ["c_attn"] if name.startswith("gpt2") else ["q_proj", "v_proj"]
    plan, setups, shapes = prepare(u_plan(tmp_path, cuts=list(cuts), parties=parties, targets=targets), epochs=1)
    steps = [s for s in islice(schedule(plan, next(iter(setups.values())).splits), 3)]
    assert all(s.mode == "train" for s in steps)

    # the unsplit reference: the model from its folder with peft adapters on the same layers, started from the
    # adapters the plan draws (build_network: the whole model with every segment's adapters), plain autograd
    ref = type(model).from_pretrained(tmp_path)
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                 fan_in_fan_out=name.startswith("gpt2")), ref)
    start = build_network(plan, "lm").state_dict()
    assert set(start) and all("lora_" in k for k in start)  # the whole network's state: adapters only
    ref.load_state_dict(start, strict=False)
    for n, p in ref.named_parameters():
        p.requires_grad_("lora_" in n)
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    data = {k: v for s in setups.values() for k, v in s.inputs.items()}
    for s in steps:
        opt.zero_grad()
        out = ref(input_ids=data["hospital.input_ids"][s.rows], attention_mask=data["hospital.attention_mask"][s.rows])
        F.cross_entropy(out.logits, data["hospital.y"][s.rows]).backward()
        opt.step()

    run_local(plan, setups, shapes, steps=steps)
    trained = {k: v for party in setups.values() for mod in party.modules.values() for k, v in mod.state_dict().items()}
    assert trained.keys() == start.keys()  # what a party saves: its adapters, not the frozen base
    worst = max((trained[k] - ref.state_dict()[k]).abs().max().item() for k in trained)
    moved = max((trained[k] - start[k]).abs().max().item() for k in trained)
    assert worst <= 1e-5 and moved > 1e-3, (worst, moved)


def test_a_segment_without_adapters_trains_its_whole_piece_and_result_merges(tmp_path):
    import splitlearn

    model, _ = make("llama_cls")
    model.save_pretrained(tmp_path)
    plan = u_plan(tmp_path)
    result = splitlearn.train(plan)
    merged = merge_lora(result.model)
    assert isinstance(merged, transformers.LlamaForSequenceClassification)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    ids, mask = batch()
    adapted = splitlearn.train(plan).model  # the same run again: adapters in place, not merged
    assert torch.allclose(merged(input_ids=ids, attention_mask=mask).logits,
                          adapted(input_ids=ids, attention_mask=mask).logits, atol=1e-5)
    full = splitlearn.train(u_plan(tmp_path, lora=False))  # no adapters: every weight of every piece trains
    assert len(full.modules["server"]["middle"].state_dict()) == 2 * len(model.model.layers[0].state_dict())


def test_plan_refusals_name_the_entry(tmp_path):
    model, _ = make("llama_cls")
    model.save_pretrained(tmp_path)
    plan = u_plan(tmp_path)
    bad = plan.model_copy(update={"segments": {**plan.segments, "bottom": plan.segments["bottom"].model_copy(
        update={"merge": "concat"})}})
    with pytest.raises(PlanError, match="merge") as e:
        build_segment(bad, "bottom")
    assert e.value.entry == "segments.bottom.merge"
    lora = plan.segments["middle"].lora.model_copy(update={"target_modules": ["c_attn"]})
    bad = plan.model_copy(update={"segments": {**plan.segments, "middle": plan.segments["middle"].model_copy(
        update={"lora": lora})}})
    with pytest.raises(PlanError, match="none of its layers is named.*q_proj") as e:
        build_segment(bad, "middle")
    assert e.value.entry == "segments.middle.lora"


@pytest.mark.parametrize("name", ["llama_lm", "gpt2_lm"])
def test_split_greedy_generation_equals_the_model_token_for_token(name):
    model, cuts = make(name)
    prompt = torch.randint(1, V, (1, 5), generator=torch.Generator().manual_seed(3))
    want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, min_new_tokens=20,
                          do_sample=False)[0, 5:].tolist()
    got = greedy([piece_of(model, cuts, k) for k in range(3)], prompt, 20)
    assert got.tokens == want and len(set(want)) > 1
    assert got.bytes_per_token == [16 * 4, 16 * 4]  # one position's hidden state, float32, over each cut


# -- models other than the examples: what a folder holds, other families, what is refused ---------------------------

def test_a_base_model_folder_loads_under_a_task_head_and_a_missing_base_weight_is_refused(tmp_path):
    """A folder saved from BertModel (no "bert." prefix) read as a classifier: the base weights found as
    from_pretrained finds them, only the new head initialised; a base weight the folder lacks is refused, never
    left random (it would run, or train, from noise)."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    transformers.BertModel(bert(num_labels=3)).save_pretrained(tmp_path)
    ref = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    cuts = ["bert.encoder.layer.1"]
    pieces = [load_piece(tmp_path, "classification", cuts, k) for k in range(2)]
    for piece in pieces:
        for k, v in piece.state_dict().items():
            assert k.startswith("classifier.") or torch.equal(v, ref.state_dict()[k]), k
    assert pieces[1].fresh == ["classifier.bias", "classifier.weight"] and not pieces[0].fresh
    weights = load_file(tmp_path / "model.safetensors")
    del weights["encoder.layer.0.attention.self.query.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HFError, match="lack 1 tensor.*encoder.layer.0.attention.self.query.weight"):
        load_piece(tmp_path, "classification", cuts, 0)
    assert load_piece(tmp_path, "classification", cuts, 1).state_dict()  # the other party's piece needs it not


def test_a_bf16_folder_builds_float32_pieces_and_config_entries_are_the_configurations_own(tmp_path):
    model, cuts = make("llama_lm")
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    pieces = [load_piece(tmp_path, "causal_lm", cuts, k) for k in range(3)]
    assert {t.dtype for p in pieces for t in p.state_dict().values()} == {torch.float32}  # precision: the plan's
    ids, mask = batch()
    x = ids
    for p in pieces[:-1]:
        x, _ = p(x, mask)
    assert pieces[-1](x, mask).dtype == torch.float32
    with pytest.raises(HFError, match="'trust_remote_code' is not one of LlamaConfig's"):
        load_piece(tmp_path, "causal_lm", cuts, 0, config={"trust_remote_code": True})
    assert load_piece(tmp_path, "causal_lm", cuts, 0, config={"rms_norm_eps": 1e-3}).hf.config.rms_norm_eps == 1e-3


def test_models_a_cut_cannot_carry_are_refused_by_name():
    qwen = transformers.Qwen2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                    num_attention_heads=2, num_key_value_heads=2, use_sliding_window=True,
                                    sliding_window=4, max_window_layers=2)
    with pytest.raises(HFError, match="attend in different ways.*sliding_attention"):
        piece_of(transformers.Qwen2ForCausalLM(qwen), ["model.layers.1"], 0)
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=V, hidden_size=16, ffn_dim=32, num_hidden_layers=4, num_attention_heads=2, word_embed_proj_dim=16,
        pad_token_id=0)).eval()  # its final norm is registered before its blocks, and runs after them
    ids, mask = batch()
    x = ids
    pieces = [piece_of(opt, ["model.decoder.layers.1"], k) for k in range(2)]
    with pytest.raises(HFError, match="registered before the blocks runs after them"):
        pieces[1](pieces[0](x, mask)[0], mask)


def test_a_classifier_without_a_pad_id_pools_each_note_at_its_last_token():
    model, cuts = make("llama_cls")
    model.config.pad_token_id = None
    ids, mask = batch()
    want = [model(input_ids=ids[i:i + 1, :int(mask[i].sum())]).logits for i in range(len(ids))]  # one at a time
    x, _ = piece_of(model, cuts, 0)(ids, mask)
    got = piece_of(model, cuts, 1)(x, mask)
    assert torch.allclose(got, torch.cat(want), atol=1e-5) and model.config.pad_token_id is None


def test_lora_on_one_segment_only_gives_the_whole_trained_model(tmp_path):
    import splitlearn

    model, _ = make("llama_cls")
    model.save_pretrained(tmp_path)
    plan = u_plan(tmp_path, lora=False)
    middle = plan.segments["middle"].model_copy(update={"lora": u_plan(tmp_path).segments["middle"].lora})
    plan = plan.model_copy(update={"segments": {**plan.segments, "middle": middle}})
    result = splitlearn.train(plan)
    trained = {k: v for mods in result.modules.values() for m in mods.values() for k, v in m.state_dict().items()}
    whole = result.model.state_dict()
    assert any("lora_" in k for k in trained) and any(k == "score.weight" for k in trained)
    assert all(torch.equal(whole[k], v) for k, v in trained.items())  # every segment's weights, adapters included


def test_other_families_compose_exactly_from_a_folder_and_the_callers_model_stays_its_own(tmp_path):
    """Gemma (an embedding module holding a saved weight and a computed buffer) and GPT-NeoX (a checkpoint whose
    head transformers renames, embed_out): the pieces read from the folder compose to the model exactly; a piece cut
    from a model object owns its weights (training it leaves the caller's model as it was)."""
    torch.manual_seed(0)
    gemma = transformers.GemmaForCausalLM(transformers.GemmaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, pad_token_id=0)).eval()
    neox = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2)).eval()
    ids, mask = batch()
    for model, cut in ((gemma, "model.layers.1"), (neox, "gpt_neox.layers.1")):
        folder = tmp_path / type(model).__name__
        model.save_pretrained(folder)
        pieces = [load_piece(folder, "causal_lm", [cut], k) for k in range(2)]
        assert torch.equal(pieces[1](pieces[0](ids, mask)[0], mask), model(input_ids=ids, attention_mask=mask).logits)
    before = {k: v.clone() for k, v in gemma.state_dict().items()}
    with torch.no_grad():
        for p in piece_of(gemma, ["model.layers.1"], 0).parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in gemma.state_dict().items())


def test_a_tied_embedding_trains_at_one_party_only_under_adapters(tmp_path):
    """GPT-2 ties its head to its embeddings: U-shaped with adapters everywhere (both copies frozen) trains; a bottom
    without adapters would train its copy while the top's stays: refused, naming the segment."""
    import splitlearn

    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(gpt2()).save_pretrained(tmp_path)
    cuts = ("transformer.h.0", "transformer.h.2")
    frozen = u_plan(tmp_path, cuts=cuts, task="causal_lm", targets=("c_attn",))
    assert build_segment(frozen, "top").tied_across
    bottom = frozen.segments["bottom"].model_copy(update={"lora": None})
    plan = frozen.model_copy(update={"segments": {**frozen.segments, "bottom": bottom}})
    with pytest.raises(PlanError, match="'bottom' trains a weight tied to one another segment holds") as e:
        splitlearn.train(plan)
    assert e.value.entry == "segments.bottom"
