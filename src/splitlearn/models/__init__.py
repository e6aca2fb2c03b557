"""Model zoo and building the segments of a plan."""

from .build import build_segment, build_network
from .zoo import ZOO, cnn, mlp

__all__ = ["ZOO", "mlp", "cnn", "build_network", "build_segment"]
