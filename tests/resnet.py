"""A torchvision-style ResNet written here (no torchvision dependency), for cutting by name.

``ResNet`` has its own ``forward`` with residual additions inside its blocks; the cuts the
tests use fall between blocks (``layer1``, ``layer2``), where one tensor crosses.
"""

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    """stem, layer1 (8 ch), layer2 (16 ch, stride 2), layer3 (32 ch, stride 2), pool, fc."""

    def __init__(self, in_channels: int = 1, classes: int = 10, width: int = 8, norm: bool = True):
        super().__init__()
        bn = nn.BatchNorm2d if norm else nn.Identity
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = bn(width)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2))
        self.layer3 = nn.Sequential(BasicBlock(2 * width, 4 * width, 2))
        self.fc = nn.Linear(4 * width, classes)
        if not norm:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.track_running_stats, m.running_mean, m.running_var = False, None, None

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def resnet(**kwargs) -> ResNet:
    return ResNet(**kwargs)


class Skip(nn.Module):
    """A skip connection around ``middle``: cutting after ``middle`` must be refused (after ``first`` is fine)."""

    def __init__(self):
        super().__init__()
        self.first, self.middle, self.last = nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.first(x))
        return self.last(torch.relu(self.middle(h)) + h)


class Stack(nn.Sequential):
    """An nn.Sequential subclass whose constructor takes other arguments than its layers."""

    def __init__(self, width: int = 32):
        super().__init__(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


class Tied(nn.Module):
    """``a`` runs before and after ``b``: cutting after ``b`` would give two parties a copy of ``a`` each."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.a(self.b(torch.relu(self.a(x)))))


class ReadsMode(nn.Module):
    """A forward that reads ``self.training``: a traced piece would fix one mode, so cutting it is refused."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.b(nn.functional.dropout(torch.relu(self.a(x)), 0.5, self.training))


class Pair(nn.Module):
    """``a`` returns a tuple: no wire can carry it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = _Split(), nn.Linear(32, 10)

    def forward(self, x):
        h, _ = self.a(x)
        return self.b(h)


class _Split(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 32)

    def forward(self, x):
        h = self.lin(x)
        return h, h
