"""The server: it holds the labels and runs the top of the model and the loss, in its own training loop
(docs/own-loop.md). Start it first (see client.py)::

    python examples/own_loop/server.py --certs certs --listen 127.0.0.1:7000
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import splitlearn
from splitlearn.wire.transport import Transport
from splitlearn.wire.transport.grpc import GrpcTransport
from splitlearn.wire.transport.tls import load_credentials

from split_model import ACCUMULATE, WIRE, batches, digits, pieces


def train(transport: Transport, epochs: int = 5) -> float:
    """Train the top with the hospital, then score the test rows it sends; returns the test accuracy."""
    _, labels = digits()  # the server's half of the data
    _, top = pieces()  # and of the model
    opt = torch.optim.AdamW(top.parameters(), lr=1e-2, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    with splitlearn.Stage(top, transport, previous="hospital", receive=WIRE) as stage:
        for epoch in range(epochs):
            rows = batches(epoch)
            for i, batch in enumerate(rows):
                logits = stage.forward()  # top(the hospital's activations)
                loss = F.cross_entropy(logits, labels[batch]) / ACCUMULATE
                loss.backward()
                stage.backward()  # the activations' gradient goes back to the hospital
                if i % ACCUMULATE == ACCUMULATE - 1 or i == len(rows) - 1:
                    opt.step()
                    opt.zero_grad()
            schedule.step()
            print(f"server: epoch {epoch + 1} loss {loss.item() * ACCUMULATE:.3f}")
        top.eval()
        correct = total = 0
        with torch.no_grad():
            for batch in batches(None):
                correct += int((stage.forward().argmax(1) == labels[batch]).sum())
                total += len(batch)
    return correct / total


def main(argv: list[str] | None = None) -> float:
    args = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args.add_argument("--certs", required=True, help="folder with ca.pem, server.pem and server.key")
    args.add_argument("--listen", required=True, help="HOST:PORT to listen on, e.g. 0.0.0.0:7000")
    args.add_argument("--epochs", type=int, default=5)
    a = args.parse_args(argv)
    transport = GrpcTransport("server", listen=a.listen, accept=["hospital"],
                              credentials=load_credentials(a.certs, "server"))
    transport.start()
    try:
        transport.wait_connected()
        accuracy = train(transport, a.epochs)
    finally:
        transport.close()
    print(f"server: test accuracy {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
