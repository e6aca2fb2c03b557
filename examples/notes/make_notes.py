"""Write synthetic clinical notes and a small Llama-style base model trained on them (no download).

notes.csv holds the notes (columns id, text, diagnosis, prompt): 1 to 4 sentences of symptoms,
observations, history and examination findings from a template grammar, each phrase telling the
diagnosis (pneumonia, heart_failure, diabetes, copd), another diagnosis, or nothing, so a note
is a noisy hint and a short one may be no hint at all. ``prompt`` is the instruction that asks for
the note ("write the clinical note of a patient with copd."): a language model fine-tuned on
prompt + text with the prompt's tokens masked learns to write a note for a diagnosis.
notes_aux.csv holds other notes of the same grammar (another seed, none equal to a note of
notes.csv): public text an attacker may hold. Every note is unique, and the classes are equal in
size up to one. model/ is a local model folder: a word-level tokenizer trained on notes.csv
(model/tokenizer.json) and a small LlamaForCausalLM trained briefly on the notes as a language
model (model.safetensors, config.json). Then:

    python examples/notes/make_notes.py            # about 25 s on one core; --small (CI size) about 6 s
"""

import argparse
import csv
import math
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils.logging import disable_progress_bar

HERE = Path(__file__).parent
DIAGNOSES = ("pneumonia", "heart_failure", "diabetes", "copd")
COLUMNS = ("id", "text", "diagnosis", "prompt")
SPECIAL = ("<pad>", "<unk>", "<s>", "</s>")  # ids 0, 1, 2, 3
PROMPT = "write the clinical note of a patient with {}."

# Phrases by diagnosis ("" is neutral: fits any patient). Lowercase, no apostrophes, colons or
# "do not", so that the tokenizer's decoder gives the text back exactly.
SYMPTOMS = {
    "pneumonia": ["a productive cough", "fever and chills", "sharp chest pain on breathing", "cough with green sputum",
                  "rigors"],
    "heart_failure": ["swollen ankles", "breathlessness lying flat", "waking at night short of breath",
                      "weight gain of three kilograms", "reduced exercise tolerance"],
    "diabetes": ["excessive thirst", "passing urine frequently", "blurred vision", "tingling in both feet",
                 "unintended weight loss"],
    "copd": ["a chronic morning cough", "wheeze on exertion", "breathlessness climbing stairs",
             "chest infections every winter", "thick sputum most days"],
    "": ["tiredness", "poor sleep", "a mild headache", "low mood", "back pain", "reduced appetite",
         "shortness of breath", "feeling generally unwell", "dizziness"],
}
HISTORY = {
    "pneumonia": ["a recent viral illness", "a chest infection last year", "contact with a sick relative",
                  "a recent cold"],
    "heart_failure": ["a previous heart attack", "atrial fibrillation", "long standing hypertension",
                      "a leaking heart valve"],
    "diabetes": ["obesity", "gestational diabetes", "a family history of diabetes", "high cholesterol"],
    "copd": ["smoking forty cigarettes a day", "work in a coal mine", "smoking for thirty years",
             "frequent inhaler use"],
    "": ["a knee replacement", "migraine", "an appendectomy", "anxiety", "asthma as a child", "hypertension"],
}
FINDINGS = {
    "pneumonia": ["crackles at the right base", "bronchial breathing", "consolidation on the chest x ray",
                  "a raised white cell count"],
    "heart_failure": ["pitting oedema to the knees", "a raised jugular venous pressure",
                      "an enlarged heart on the chest x ray", "fine crackles at both bases"],
    "diabetes": ["glucose in the urine", "a raised hba1c", "reduced sensation in the feet", "ketones in the urine"],
    "copd": ["a prolonged expiratory phase", "hyperinflated lungs on the chest x ray", "a barrel shaped chest",
             "reduced peak flow"],
    "": ["a soft abdomen", "normal heart sounds", "no rash", "clear ears", "a normal neurological examination"],
}
# Observations: (mean, sd) by diagnosis, else the default; values rounded to `step`.
VITALS = {
    "temperature": ({"pneumonia": (38.6, 0.7)}, (36.9, 0.4), 1, "temperature {}"),
    "heart_rate": ({"pneumonia": (102, 12), "heart_failure": (96, 12)}, (80, 11), 1, "heart rate {}"),
    "saturation": ({"copd": (91, 2.5), "pneumonia": (93, 2.5), "heart_failure": (95, 2)}, (97, 1.3), 1,
                   "oxygen saturation {} percent"),
    "glucose": ({"diabetes": (250, 60)}, (110, 25), 10, "blood glucose {}"),
    "pressure": ({}, (135, 15), 5, "blood pressure {} over {}"),
}
OWN, OTHER = 0.65, 0.10  # a phrase tells the diagnosis, another one, or (the rest) nothing


def _phrase(rng: np.random.Generator, table: dict[str, list[str]], y: str) -> str:
    u = rng.random()
    key = y if u < OWN else str(rng.choice([d for d in DIAGNOSES if d != y])) if u < OWN + OTHER else ""
    return str(rng.choice(table[key]))


def _vitals(rng: np.random.Generator, y: str) -> str:
    parts = []
    for name in sorted(rng.choice(list(VITALS), size=int(rng.integers(1, 4)), replace=False), key=list(VITALS).index):
        by, default, step, text = VITALS[name]
        mean, sd = by.get(y, default)
        value = int(round(rng.normal(mean, sd) / step) * step)
        parts.append(text.format(value, int(round(rng.normal(82, 8) / 5) * 5)) if name == "pressure"
                     else text.format(value))
    return "observations show " + (", ".join(parts[:-1]) + " and " if len(parts) > 1 else "") + parts[-1] + "."


def note(rng: np.random.Generator, y: str) -> str:
    """One note of diagnosis ``y``: 1 to 4 of the sentence kinds, in the order a note has them."""
    k = int(rng.choice([1, 2, 3, 4], p=[0.15, 0.3, 0.3, 0.25]))
    kinds = sorted(rng.choice(4, size=k, replace=False))
    out = []
    for kind in kinds:
        if kind == 0:
            first = _phrase(rng, SYMPTOMS, y)
            if rng.random() < 0.5:
                out.append(f"complains of {first} for {int(rng.integers(2, 15))} days.")
            else:
                out.append(f"presents with {first} and {_phrase(rng, SYMPTOMS, y)}.")
        elif kind == 1:
            out.append(_vitals(rng, y))
        elif kind == 2:
            out.append(f"past history includes {_phrase(rng, HISTORY, y)}.")
        else:
            out.append(f"{'examination finds' if rng.random() < 0.5 else 'examination shows'} "
                       f"{_phrase(rng, FINDINGS, y)}.")
    return " ".join(out)


def make_notes(rows: int, seed: int, prefix: str = "note", avoid: frozenset[str] = frozenset()) -> list[dict[str, str]]:
    """``rows`` unique notes (none in ``avoid``), the diagnoses equal in number up to one, in a seeded
    order; ids ``f"{prefix}-{i:05d}"``."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(rows) % len(DIAGNOSES))
    seen, out = set(avoid), []
    for i, c in enumerate(labels):
        y = DIAGNOSES[c]
        for _ in range(10_000):
            text = note(rng, y)
            if text not in seen:
                break
        else:
            raise ValueError(f"the grammar ran out of new {y} notes after {i} rows: ask for fewer --rows")
        seen.add(text)
        out.append({"id": f"{prefix}-{i:05d}", "text": text, "diagnosis": y,
                    "prompt": PROMPT.format(y.replace("_", " "))})
    return out


def make_corpus(rows: int, aux_rows: int, seed: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The notes and the auxiliary notes (seeds ``[seed, 0]`` and ``[seed, 1]``), disjoint in text."""
    notes = make_notes(rows, np.random.SeedSequence([seed, 0]).generate_state(1)[0])
    aux = make_notes(aux_rows, np.random.SeedSequence([seed, 1]).generate_state(1)[0], prefix="aux",
                     avoid=frozenset(r["text"] for r in notes))
    return notes, aux


def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


def train_tokenizer(texts: list[str]) -> Tokenizer:
    """A word-level tokenizer of ``texts``: lowercase, words and punctuation apart, ``<s> ... </s>`` around
    one text (a pair: ``<s> A B </s>``, B's type id 1, so a prompt A is told from its text B), padding
    with ``<pad>`` in a batch; decoding gives a note back exactly."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(SPECIAL)))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A $B:1 </s>:1",
                                                       special_tokens=[("<s>", bos), ("</s>", eos)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # "fever , cough ." -> "fever, cough."
    tok.enable_padding(pad_id=tok.token_to_id("<pad>"), pad_token="<pad>")
    return tok


def llama_config(tok: Tokenizer, small: bool = False) -> LlamaConfig:
    """The base model's config: 4 layers, 4 heads, 2 key/value heads; hidden 64 (32 ``small``)."""
    hidden = 32 if small else 64
    return LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, pad_token_id=tok.token_to_id("<pad>"),
                       bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>"),
                       tie_word_embeddings=False)


def batch(tok: Tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """``texts`` padded to their longest: input ids, attention mask, and labels (-100 on padding)."""
    enc = tok.encode_batch(texts)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@torch.no_grad()
def lm_loss(model: LlamaForCausalLM, tok: Tokenizer, texts: list[str], size: int = 64) -> float:
    """Next-token cross-entropy of ``model`` on ``texts``, averaged over every predicted token."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(texts), size):
        b = batch(tok, texts[i:i + size])
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        target = b["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
        count += int((target != -100).sum())
    return total / count


def train_base(model: LlamaForCausalLM, tok: Tokenizer, texts: list[str], steps: int, size: int, seed: int,
               lr: float = 3e-3) -> None:
    """``steps`` AdamW steps of next-token prediction on random batches of ``size`` of ``texts``."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        pick = rng.choice(len(texts), size=min(size, len(texts)), replace=False)
        loss = model(**batch(tok, [texts[i] for i in pick])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def _positive(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def main(argv: list[str] | None = None) -> dict:
    """Write the corpus and the model folder; return the summary it prints."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=HERE, help="folder to write into (default: this script's)")
    p.add_argument("--rows", type=_positive, help="notes in notes.csv (default 2000; --small 300)")
    p.add_argument("--aux-rows", type=_positive, help="notes in notes_aux.csv (default: half of --rows)")
    p.add_argument("--seed", type=_positive, default=0)
    p.add_argument("--small", action="store_true", help="CI size: 300 notes, hidden size 32, 40 base steps")
    p.add_argument("--base-steps", type=_positive, help="training steps of the base model (default 300; --small 40)")
    a = p.parse_args(argv)
    rows = a.rows if a.rows is not None else 300 if a.small else 2000
    if rows < 4 * len(DIAGNOSES):
        p.error(f"--rows must be at least {4 * len(DIAGNOSES)} (four notes of each diagnosis), got {rows}")
    aux_rows = a.aux_rows if a.aux_rows is not None else rows // 2
    steps = a.base_steps if a.base_steps is not None else 40 if a.small else 300
    notes, aux = make_corpus(rows, aux_rows, a.seed)
    (a.out / "model").mkdir(parents=True, exist_ok=True)
    write_csv(a.out / "notes.csv", notes)
    write_csv(a.out / "notes_aux.csv", aux)
    texts = [r["text"] for r in notes]
    tok = train_tokenizer(texts + sorted({r["prompt"] for r in notes}))
    torch.manual_seed(a.seed)
    model = LlamaForCausalLM(llama_config(tok, a.small))
    held = [r["text"] for r in aux]
    before = lm_loss(model, tok, held) if held else math.nan
    train_base(model, tok, texts, steps, 16 if a.small else 32, a.seed)
    after = lm_loss(model, tok, held) if held else math.nan
    disable_progress_bar()  # save_pretrained's bar for one small file
    model.save_pretrained(a.out / "model")
    tok.save(str(a.out / "model" / "tokenizer.json"))
    summary = {"rows": {y: sum(r["diagnosis"] == y for r in notes) for y in DIAGNOSES}, "aux_rows": len(aux),
               "vocab": tok.get_vocab_size(), "parameters": sum(t.numel() for t in model.parameters()),
               "base_steps": steps, "loss_before": before, "loss_after": after,
               "loss_train": lm_loss(model, tok, texts)}
    print(f"notes.csv: {rows} notes ({', '.join(f'{y} {n}' for y, n in summary['rows'].items())}); "
          f"notes_aux.csv: {len(aux)} notes")
    print(f"model/: tokenizer of {summary['vocab']} words, LlamaForCausalLM of {summary['parameters']:,} parameters; "
          f"language-model loss on notes_aux.csv {before:.3f} before, {after:.3f} after {steps} steps "
          f"({summary['loss_train']:.3f} on notes.csv)")
    return summary


if __name__ == "__main__":
    main()
