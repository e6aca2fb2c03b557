"""Plan entries of a Hugging Face ``transformers`` network: ``[networks.X] hf`` and ``[segments.X] lora``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["HFSpec", "LoraSpec"]


class HFSpec(BaseModel):
    """A transformers model saved in a local folder (``save_pretrained``: ``config.json`` and safetensors),
    relative to the plan file; each party reads only the layers it runs from its own copy of the folder.

    ``task``: ``causal_lm`` (the language-model head: logits per token), ``classification`` (a sequence
    classification head: logits per note; a vision model's image classifier: logits per image) or ``base`` (the
    last hidden states). ``config``: entries of the
    saved configuration to override (``num_labels`` of a new classification head, initialised from the plan
    seed). ``hf = "folder"`` is short for ``hf = { folder = "folder" }``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    folder: str = Field(min_length=1)
    task: Literal["causal_lm", "classification", "base"] = "causal_lm"
    config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"folder": v} if isinstance(v, str) else v

    @field_validator("config")
    @classmethod
    def _plain(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k, x in v.items() if not isinstance(x, (int, float, str, bool, list, dict))]
        if bad:
            raise ValueError(f"config entries {bad} are not plain values (numbers, strings, lists, tables)")
        return v


class LoraSpec(BaseModel):
    """``peft`` LoRA adapters on a segment's linear layers named ``target_modules`` (``["q_proj", "v_proj"]``):
    rank ``r``, scale ``alpha / r``, ``dropout`` on their input. The segment's base weights are frozen: only the
    adapters train (and the modules named in ``train``, and weights the model folder lacks, such as a new
    classification head), and only what trains is in its weights file and checkpoints."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(8, ge=1, le=4096)
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(min_length=1)
    train: list[str] = Field(default_factory=list)  # modules trained whole beside the adapters (a head: "score")

    @field_validator("target_modules", "train")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        bad = [n for n in v if not n or not n.replace("_", "").isalnum()]
        if bad:
            raise ValueError(f"target_modules {bad}: give the last part of a linear layer's name (q_proj, c_attn)")
        return v
