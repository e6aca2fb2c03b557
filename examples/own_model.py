"""Split your own nn.Module and train it, in a few lines (run: python examples/own_model.py).

The hospital (``client``) runs the model up to ``layer1``; the server runs the rest. The
module is yours: splitlearn trains a copy of each part and hands the trained model back whole.
"""

import sys

import torch

import splitlearn
from my_resnet import ResNet  # next to this script

torch.manual_seed(0)  # the object's initial weights are yours: seed them for a reproducible run
model = ResNet()
result = splitlearn.split(model, cut="layer1", data="digits", epochs=int(sys.argv[1]) if len(sys.argv) > 1 else 3)
print(f"test accuracy {result['metrics']['test_accuracy']:.3f}; the client sent "
      f"{result['parties']['client']['bytes_sent'] / 1e6:.2f} MB")
trained = result.model  # a ResNet holding the trained weights of both parts
