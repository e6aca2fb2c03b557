"""splitlearn: split learning in one engine, every configuration as a plan."""

from .api import predict, train
from .graph import build_graph
from .plan import Plan, PlanError, load_plan

__all__ = ["Plan", "PlanError", "load_plan", "build_graph", "train", "predict"]
__version__ = "0.1.0"
