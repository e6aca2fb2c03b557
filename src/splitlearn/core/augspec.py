"""Plan entries of a party's image augmentation (``[parties.X.augment]``): one table per step, by ``kind``
(:mod:`splitlearn.core.augment` applies them)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

__all__ = ["RandomCropStep", "FlipStep", "ColorJitterStep", "AugmentStep", "AUGMENT_STEPS", "augment_kinds"]


class _AugmentStep(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class RandomCropStep(_AugmentStep):
    """Pad by ``padding`` and crop back at a random offset per row: a shift of at most ``padding`` pixels."""

    kind: Literal["random_crop"]
    padding: int = Field(ge=1)
    padding_mode: Literal["constant", "reflect", "replicate"] = "constant"
    fill: float = 0.0  # the padding's value (constant only)

    @model_validator(mode="after")
    def _fill_is_constants(self) -> "RandomCropStep":
        if "fill" in self.model_fields_set and self.padding_mode != "constant":
            raise ValueError(f"random_crop fill is the value of constant padding; padding_mode = "
                             f"\"{self.padding_mode}\" takes its values from the image: remove fill")
        return self


class FlipStep(_AugmentStep):
    """Flip each row left-right (``hflip``) or upside down (``vflip``) with chance ``p``."""

    kind: Literal["hflip", "vflip"]
    p: float = Field(0.5, ge=0.0, le=1.0)


class ColorJitterStep(_AugmentStep):
    """Brightness, contrast and saturation factors drawn per row from ``[max(0, 1 - v), 1 + v]``."""

    kind: Literal["color_jitter"]
    brightness: float = Field(0.0, ge=0.0)
    contrast: float = Field(0.0, ge=0.0)
    saturation: float = Field(0.0, ge=0.0)
    clamp: tuple[float, float] | None = None  # [low, high]: clipped after each adjustment (none: not clipped)

    @model_validator(mode="after")
    def _something(self) -> "ColorJitterStep":
        if not (self.brightness or self.contrast or self.saturation):
            raise ValueError("color_jitter changes nothing: give brightness, contrast or saturation above 0")
        if self.clamp is not None and not self.clamp[0] < self.clamp[1]:
            raise ValueError(f"color_jitter clamp must be [low, high] with low < high, got {list(self.clamp)}")
        return self


AUGMENT_STEPS: dict[str, type[_AugmentStep]] = {"random_crop": RandomCropStep, "hflip": FlipStep, "vflip": FlipStep,
                                                "color_jitter": ColorJitterStep}


def augment_kinds() -> str:
    """The augmentation kinds and their arguments, for an error message."""
    return "; ".join(f"{k} ({', '.join(f for f in cls.model_fields if f != 'kind')})"
                     for k, cls in AUGMENT_STEPS.items())


def _augment_step(v: Any) -> Any:
    """A step's kind and argument names checked before its values, with a message listing what is accepted."""
    if isinstance(v, _AugmentStep):
        return v
    if not isinstance(v, dict):
        raise ValueError(f"an augmentation step is a table such as {{ kind = \"hflip\", p = 0.5 }}, got {v!r}; "
                         f"kinds: {augment_kinds()}")
    kind = v.get("kind")
    if kind not in AUGMENT_STEPS:
        raise ValueError(f"unknown augmentation kind {kind!r}; accepted: {augment_kinds()}")
    fields = AUGMENT_STEPS[kind].model_fields
    unknown = sorted(set(v) - set(fields))
    if unknown:
        raise ValueError(f"{kind} takes no {', '.join(map(repr, unknown))}; it takes "
                         f"{', '.join(f for f in fields if f != 'kind')}")
    return v


# One step of a party's image augmentation (:mod:`splitlearn.core.augment`): a table with its kind and arguments.
AugmentStep = Annotated[RandomCropStep | FlipStep | ColorJitterStep, Field(discriminator="kind"),
                        BeforeValidator(_augment_step)]
