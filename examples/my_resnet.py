"""A user's own network: a small ResNet with its own ``forward`` (no nn.Sequential).

``examples/resnet.toml`` names ``my_resnet:resnet`` as its factory; splitlearn finds this file
next to the plan (no PYTHONPATH) and cuts the network after the submodule a segment names
(``cut = "layer1"``) by tracing it with torch.fx. ``examples/own_model.py`` does the same in Python.
"""

import torch
from torch import nn


class Block(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection (inside the block: no cut splits it)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, in_channels: int = 1, classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = Block(width, width)
        self.layer2 = Block(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):  # x: (batch, 1, 8, 8)
        x = self.layer2(self.layer1(self.stem(x)))  # (batch, 32, 4, 4)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet(**kwargs) -> ResNet:
    return ResNet(**kwargs)
