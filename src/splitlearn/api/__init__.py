"""The calls most users need: :func:`split` a module of their own and train it, :func:`train` a
plan (in threads, party processes or on Ray), and :func:`predict` from a finished run; or
:func:`cut` it and train the pieces in a loop of one's own, each party's in a :class:`Stage`; :func:`generate` decodes
with a trained language model's pieces."""

from .cutting import cut
from .generation import generate
from .prediction import predict
from .splitting import split, split_plan
from .stage import Stage
from .training import LAUNCHERS, Result, train, train_prepared

__all__ = ["split", "split_plan", "train", "train_prepared", "predict", "generate", "Result", "LAUNCHERS", "cut", "Stage"]
