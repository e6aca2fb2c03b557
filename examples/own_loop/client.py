"""The hospital: it holds the digit images and runs the bottom of the model, in its own training loop
(docs/own-loop.md). Over gRPC with mutual TLS, from the repository's root::

    splitlearn certs examples/vanilla.toml --out certs      # a CA, and keys for "hospital" and "server"
    python examples/own_loop/server.py --certs certs --listen 127.0.0.1:7000 &
    python examples/own_loop/client.py --certs certs --server 127.0.0.1:7000
"""

from __future__ import annotations

import argparse

import torch

import splitlearn
from splitlearn.wire.transport import Transport
from splitlearn.wire.transport.grpc import GrpcTransport
from splitlearn.wire.transport.tls import load_credentials

from split_model import ACCUMULATE, WIRE, batches, digits, pieces


def train(transport: Transport, epochs: int = 5) -> splitlearn.Stage:
    """Train the bottom with the server, then send the test rows' activations; returns the stage (its meter)."""
    images, _ = digits()  # the hospital's half of the data
    bottom, _ = pieces()  # and of the model
    opt = torch.optim.AdamW(bottom.parameters(), lr=1e-2, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    with splitlearn.Stage(bottom, transport, next="server", send=WIRE) as stage:
        for epoch in range(epochs):
            rows = batches(epoch)
            for i, batch in enumerate(rows):
                stage.forward(images[batch])  # the activations go to the server
                stage.backward()  # their gradient comes back, into bottom's .grad
                if i % ACCUMULATE == ACCUMULATE - 1 or i == len(rows) - 1:
                    opt.step()
                    opt.zero_grad()
            schedule.step()
        bottom.eval()
        with torch.no_grad():  # evaluation: the server scores the test rows
            for batch in batches(None):
                stage.forward(images[batch])
    return stage


def main(argv: list[str] | None = None) -> splitlearn.Stage:
    args = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args.add_argument("--certs", required=True, help="folder with ca.pem, hospital.pem and hospital.key")
    args.add_argument("--server", required=True, help="HOST:PORT the server listens on")
    args.add_argument("--epochs", type=int, default=5)
    a = args.parse_args(argv)
    transport = GrpcTransport("hospital", dial={"server": a.server}, credentials=load_credentials(a.certs, "hospital"))
    transport.start()
    try:
        transport.wait_connected()
        stage = train(transport, a.epochs)
    finally:
        transport.close()
    print(f"hospital: sent {stage.meter.bytes_sent / 1e6:.2f} MB, received {stage.meter.bytes_received / 1e6:.2f} MB")
    return stage


if __name__ == "__main__":
    main()
