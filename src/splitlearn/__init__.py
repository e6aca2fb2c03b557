"""splitlearn: split learning in one engine, every configuration as a plan."""

from .api import Result, predict, split, train
from .core.graph import build_graph
from .core.plan import Plan, PlanError
from .core.load import load_plan

__all__ = ["Plan", "PlanError", "load_plan", "build_graph", "split", "train", "predict", "Result"]
__version__ = "0.1.0"
