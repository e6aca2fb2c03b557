"""The entries of a wire (``[wires.NAME]``): its codecs, defenses and the bounds its receiver checks."""

from __future__ import annotations

from typing import Any, Callable, Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from .specs import Strict
from .registry import DEFENSES, Registry

__all__ = ["NoiseSpec", "LabelProtectionSpec", "HijackGuardSpec", "WireSpec", "GUARDS"]

# hijack detectors by name (``[wires.X] hijack_guard = { detector = NAME }``); the built-in one, ``labels``, lives in
# splitlearn.privacy.hijack, which also registers the setting's structural check among the defenses
GUARDS: Registry[Any] = Registry("hijack detector", builtins="splitlearn.privacy.hijack")


class NoiseSpec(Strict):
    """Per-sample L2 clipping of the activations to ``clip``, then Gaussian noise of std ``sigma * clip``."""

    clip: float = Field(gt=0.0)
    sigma: float = Field(ge=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)


class LabelProtectionSpec(Strict):
    """Noise the label holder adds to the gradients it returns (see :mod:`splitlearn.privacy.labels`)."""

    kind: Literal["marvell", "max_norm"] = "marvell"
    strength: float = Field(1.0, ge=0.0)


class HijackGuardSpec(Strict):
    """The sender watches the gradients it gets back on the wire and stops training when they look hijacked
    (:mod:`splitlearn.privacy.hijack`): their dependence on its labels (chance-adjusted R^2), averaged over
    ``window`` training steps, below ``threshold`` in the session's first window, or below it and below ``drop``
    times the mean of the window ending ``window`` steps before the current one begins (a hijack that begins later)."""

    detector: str = Field("labels", validate_default=True)
    window: int = Field(10, ge=2, le=1000)
    threshold: float = Field(0.45, gt=0.0, lt=1.0)
    drop: float = Field(0.55, gt=0.0, lt=1.0)

    @field_validator("detector")
    @classmethod
    def _detector(cls, v: str) -> str:
        GUARDS.get(v)  # raises ValueError naming the registered ones
        return v


class WireSpec(Strict):
    """Per-wire settings; the wire is named by its source node (segment or ``party.field``).

    Besides the built-in defenses below, a key may name any defense registered in
    :mod:`splitlearn.core.defense` when the plan is validated: its setting is kept in
    ``extra_defenses`` and written back under its own key.
    """

    codec: str = "float32"  # forward
    grad_codec: str = "float32"  # backward
    nopeek: float = Field(0.0, ge=0.0)  # sender adds nopeek * dCor(its raw inputs, the activations) to its loss
    noise: NoiseSpec | None = None  # sender clips and noises the activations it sends
    label_protection: LabelProtectionSpec | None = None  # receiver protects the gradients it returns
    randomized_response: float | None = Field(None, gt=0.0)  # label wires: epsilon of label DP (training only)
    allow_nonfinite: bool = False  # receivers refuse NaN and infinite values unless this is set
    max_abs: float = Field(1e6, gt=0.0)  # receivers refuse activations and gradients larger in magnitude (inf: none)
    # receivers refuse activations and gradients more than this many times larger in magnitude than the
    # largest the wire carried in its first epoch (so far, during it): a bound learnt from the run (0: none)
    max_jump: float = Field(1000.0, ge=0.0)
    hijack_guard: HijackGuardSpec | None = None  # the sender stops training on gradients that look hijacked (true)
    extra_defenses: dict[str, Any] = Field(default_factory=dict)  # registered defenses that are no field: key -> setting

    @model_validator(mode="before")
    @classmethod
    def _registered(cls, data: Any) -> Any:
        """Keys naming a registered defense that is no field move into ``extra_defenses``."""
        if not isinstance(data, dict):
            return data
        extra = {k: v for k, v in data.items() if k not in cls.model_fields and k in DEFENSES}
        if not extra:
            return data
        body = {k: v for k, v in data.items() if k not in extra}
        body["extra_defenses"] = {**(body.get("extra_defenses") or {}), **extra}
        return body

    @field_validator("extra_defenses")
    @classmethod
    def _known(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if key in cls.model_fields or key not in DEFENSES:
                raise ValueError(f"{key!r} is no registered defense (registered: {sorted(DEFENSES)})")
        return v

    @model_serializer(mode="wrap")
    def _flat(self, handler: Callable[["WireSpec"], dict[str, Any]]) -> dict[str, Any]:
        """Registered defenses are written under their own keys, as a plan gives them; no ``hijack_guard`` unless set."""
        data = handler(self)
        if data.get("hijack_guard") is None:
            data.pop("hijack_guard", None)  # written only where set: a plan without it hashes as before
        extra = data.pop("extra_defenses", None) or {}
        return {**data, **extra}

    @field_validator("hijack_guard", mode="before")
    @classmethod
    def _guard(cls, v: Any) -> Any:
        """``true``: the guard with its defaults; ``false``: none."""
        if v is True:
            return {}
        return None if v is False else v

    @field_validator("codec", "grad_codec")
    @classmethod
    def _codec(cls, v: str) -> str:
        from ..wire.codec import get_codec

        get_codec(v)  # raises ValueError naming the known codecs
        return v
