"""Text inversion (issue #25 item 7): the server recovering a hospital's tokens from the hidden states at a cut of
a (tiny, random, seeded) Llama: nearest-embedding inversion and a learned inverter trained on other sequences,
scored on real (unmasked) positions against chance (the share of the most frequent token)."""

import pytest
import torch

from splitlearn.tools.audit.inversion import invert, nearest_embedding, recovery, text_inversion, train_inverter

VOCAB, T = 60, 16
AUX, EVAL = 256, 128  # the attacker's auxiliary sequences, then the hospital's


@pytest.fixture(scope="module")
def llama():
    """Hidden states of every depth (0: the embeddings' output, k: after block k - 1), token ids, padding masks,
    and the embedding matrix. Tokens follow a Zipf law (chance about 0.21); lengths 6 to 16, padded at the end."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=4)).eval()
    g = torch.Generator().manual_seed(1)
    zipf = 1 / torch.arange(1, VOCAB + 1).float()
    n = AUX + EVAL
    lengths = torch.randint(6, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    ids = torch.multinomial(zipf, n * T, replacement=True, generator=g).reshape(n, T) * mask  # pads: token 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        cut = model.model.embed_tokens(ids)  # cut "model.embed_tokens": what crosses is its output
    assert torch.equal(cut, out.hidden_states[0])
    return out.hidden_states, ids, mask, model.model.embed_tokens.weight.detach()


def _eval(t: torch.Tensor) -> torch.Tensor:
    return t[AUX:]


def _aux(t: torch.Tensor) -> torch.Tensor:
    return t[:AUX]


def test_recovery_counts_real_positions_only_against_the_most_frequent_token():
    truth = torch.tensor([[5, 5, 7, 9], [5, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    pred = torch.tensor([[5, 1, 7, 9], [3, 2, 0, 0]])  # 4 of the 6 real positions; the padding matches but counts not
    r = recovery(pred, truth, mask)
    assert (r["recovered"], r["positions"], r["chance_token"]) == (4, 6, 5)
    assert r["rate"] == pytest.approx(4 / 6) and r["chance"] == pytest.approx(3 / 6)
    assert r["advantage"] == pytest.approx((4 / 6 - 3 / 6) / (1 - 3 / 6))
    assert recovery(truth, truth)["rate"] == 1.0  # no mask: every position is real


def test_the_embeddings_output_gives_every_token_back(llama):
    hidden, ids, mask, table = llama
    r = recovery(nearest_embedding(hidden[0], table), ids, mask)
    assert r["rate"] == 1.0 and r["positions"] == int(mask.sum())
    assert r["chance"] < 0.3


@pytest.mark.parametrize("depth", [1, 3], ids=["after block 0", "after block 2"])
def test_hidden_states_after_blocks_leak_the_tokens_far_above_chance(llama, depth):
    """Random blocks leave the residual stream close to the embeddings: both attacks recover nearly every token
    (measured: nearest 0.999 / 0.967, learned 1.000 / 0.999, chance 0.213)."""
    hidden, ids, mask, table = llama
    h = hidden[depth]
    nearest = recovery(nearest_embedding(_eval(h), table), _eval(ids), _eval(mask))
    inverter = train_inverter(_aux(h), _aux(ids), _aux(mask), VOCAB, epochs=20, seed=0, hidden_units=128)
    learned = recovery(invert(inverter, _eval(h)), _eval(ids), _eval(mask))
    assert learned["chance"] == nearest["chance"] < 0.3
    assert nearest["rate"] >= 0.9 and nearest["advantage"] >= 0.85
    assert learned["rate"] >= 0.95 and learned["advantage"] >= 0.9


def test_large_noise_brings_recovery_down_to_chance(llama):
    """Gaussian noise of std 1.0 on hidden states of std 0.02 (the noise defense at a large strength, the attacker
    training its inverter on noised auxiliary states too): neither attack beats guessing the most frequent token."""
    hidden, ids, mask, table = llama
    g = torch.Generator().manual_seed(2)
    h = hidden[1]
    noisy = h + torch.randn(h.shape, generator=g)
    state = torch.random.get_rng_state()
    inverter = train_inverter(_aux(noisy), _aux(ids), _aux(mask), VOCAB, epochs=20, seed=0, hidden_units=128)
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded on its own: the caller's stream untouched
    learned = recovery(invert(inverter, _eval(noisy)), _eval(ids), _eval(mask))
    nearest = recovery(nearest_embedding(_eval(noisy), table), _eval(ids), _eval(mask))
    assert nearest["rate"] < nearest["chance"]  # measured 0.022 against 0.213
    assert abs(learned["rate"] - learned["chance"]) <= 0.06  # measured 0.191 against 0.213 (clean: 1.000)


def test_text_inversion_runs_both_attacks_on_held_out_rows(llama):
    hidden, ids, mask, table = llama
    r = text_inversion(hidden[3], ids, mask, embedding=table, aux_fraction=AUX / (AUX + EVAL), epochs=20,
                       hidden_units=128)
    assert (r["aux_rows"], r["eval_rows"]) == (AUX, EVAL)
    learned, nearest = r["learned"], r["nearest_embedding"]
    assert learned["positions"] == nearest["positions"] < int(mask.sum())  # scored on the held-out rows only
    assert learned["chance"] == nearest["chance"] == r["chance"] < 0.3
    assert learned["rate"] >= 0.95 and nearest["rate"] >= 0.9
    assert text_inversion(hidden[3], ids, mask, vocab=VOCAB, epochs=1, hidden_units=0)["nearest_embedding"] is None


@pytest.mark.parametrize("call, message", [
    (lambda: nearest_embedding(torch.zeros(2, 3), torch.zeros(5, 3)), "hidden must be floating hidden states"),
    (lambda: nearest_embedding(torch.zeros(2, 3, 4), torch.zeros(5, 3)), r"embedding must be .*\[vocabulary, 4\]"),
    (lambda: train_inverter(torch.zeros(2, 3, 4), torch.full((2, 3), 9), None, 5), "outside the vocabulary of 5"),
    (lambda: train_inverter(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), 5),
     "no real"),
    (lambda: recovery(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), torch.full((2, 3), 2)),
     "mask must hold 1 at real tokens and 0 at padding"),
    (lambda: recovery(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)), "pred has shape"),
    (lambda: recovery(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long)), "pred must be an integer tensor"),
    (lambda: text_inversion(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)), "give vocab"),
    (lambda: text_inversion(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), vocab=5), "too few"),
    (lambda: nearest_embedding(torch.full((1, 1, 2), float("nan")), torch.zeros(3, 2)), "NaN"),
])
def test_bad_inputs_are_refused_with_one_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
