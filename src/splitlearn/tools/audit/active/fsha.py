"""Feature-space hijacking (FSHA; Pasquini, Ateniese and Bernaschi, "Unleashing the tiger", CCS 2021): a malicious
server returns, instead of the gradients of the task, gradients that turn the client's encoder into one the server
can invert.

The server holds public rows of the client's domain (``public``: never the client's own). Before the run it builds
a *pilot* encoder, the client's segment as the plan builds it (``FshaConfig.pilot = "plan"``: every party derives the
initial weights from the plan's seed, so the pilot is the client's initial encoder; ``"fresh"``: the architecture
with weights of the attacker's own, the paper's setting), and trains a *decoder* to invert it on the public rows
(the pilot stays fixed unless ``train_pilot``). In every training step (after ``start`` honest ones) it then, inside
its own segment's module (wrapped through :func:`~splitlearn.tools.audit.active.harness.run_against`; nothing of
the engine changes):

1. trains the decoder (and a trained pilot) one more step on a public batch;
2. trains a critic (WGAN-GP, ``critic_steps``) to tell the pilot's features of public rows from the activations the
   client sent;
3. returns, as the gradient of those activations, the gradient of ``-critic(activations)`` (times ``scale``), through
   a custom autograd function: the client's optimizer keeps its encoder where the critic puts the pilot's feature
   space, whose inverse the decoder is. The forward output is the server's honest head's, so losses and metrics look
   like a run's.

Measured (``tests/test_audit_fsha.py``): digits in [-1, 1], vanilla's networks, 92 steps: MSE 0.022 against the mean
image's 0.293. With a ``"fresh"`` pilot the critic matches the distributions but not the rows (MSE 0.42, above the
mean image), and NoPeek 0.5 on the wire takes the ``"plan"`` pilot's MSE to 0.33.

The figure is the reconstruction MSE of the client's rows through ``decoder(activations)`` (the activations its
encoder gives them at the end of the run: what the server receives at the test steps), against the mean image of
the public rows (the baseline an attacker has without the run).
"""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from ....core.load import load_plan
from ....core.plan import Plan
from ....models.build import build_segment
from ..attacks import CLIENTS_RUN, LEAKS, MILD, NONE, Attack, Settings, Target, own_data_wires, register_attack
from ..where import plan_table
from .harness import Attacked, run_against

if TYPE_CHECKING:
    from ..run import RunFolder

__all__ = ["FshaConfig", "Hijacker", "Hijacked", "hijack", "reconstruction", "FeatureSpaceHijacking",
           "MSE_LEAKS", "MSE_MILD"]

MSE_LEAKS, MSE_MILD = 0.5, 0.8  # reconstruction MSE as a share of the mean-image baseline's


@dataclass(frozen=True)
class FshaConfig:
    """The attacker's knobs: optimizers (Adam), the critic's gradient penalty and steps a received batch, the
    autoencoder's pre-training steps on the public rows, the scale of the gradient returned, the decoder's width."""

    lr: float = 1e-3
    critic_lr: float = 1e-3
    gradient_penalty: float = 10.0
    critic_steps: int = 5
    pretrain: int = 1000
    train_pilot: bool = False  # False: the pilot stays as it was built (the decoder alone learns to invert it)
    pilot: str = "plan"  # "plan": the sender's segment as the plan initialises it; "fresh": weights of its own
    scale: float = 0.01
    hidden: int = 128
    start: int = 0  # training batches the server first serves honestly (a hijack that begins later)
    seed: int = 0


def _mlp(sizes: list[int], out: nn.Module | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(0.2))
    if out is not None:
        layers.append(out)
    return nn.Sequential(*layers)


class _Hijack(torch.autograd.Function):
    """The identity forward; backward gives the activations the attacker's gradient, whatever the head's was."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, adversarial: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(adversarial)
        return z.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (adversarial,) = ctx.saved_tensors
        return adversarial.to(grad.dtype), None


class Hijacker:
    """The malicious server's state: pilot, decoder and critic, trained on ``public`` rows (flat, one a row) with
    their own generator. :meth:`install` wraps the server's segment module."""

    def __init__(self, pilot: nn.Module, public: Tensor, config: FshaConfig):
        self.config = config
        self.public = public.float().reshape(len(public), -1)
        self.gen = torch.Generator().manual_seed(config.seed)
        self.pilot = pilot
        with torch.no_grad():
            width = int(pilot(self.public[:2].reshape(2, *public.shape[1:])).reshape(2, -1).shape[1])
        self.shape = tuple(public.shape[1:])
        bounded = bool(self.public.min() >= -1.0 and self.public.max() <= 1.0)
        with _seeded(config.seed):
            self.decoder = _mlp([width, config.hidden, config.hidden, self.public.shape[1]],
                                nn.Tanh() if bounded else None)
            self.critic = _mlp([width, config.hidden, config.hidden, 1])
        learnt = [*self.pilot.parameters()] if config.train_pilot else []
        self.pilot.requires_grad_(config.train_pilot)
        self.ae_opt = torch.optim.Adam([*learnt, *self.decoder.parameters()], lr=config.lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr, betas=(0.5, 0.9))
        self.steps = 0  # training batches hijacked
        self.seen = 0  # training batches received
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small nets: more threads only wait on each other (before the run starts)
        try:
            for _ in range(config.pretrain):
                self._autoencoder_step(min(64, len(self.public)))
        finally:
            torch.set_num_threads(threads)

    def _batch(self, n: int) -> Tensor:
        return self.public[torch.randint(len(self.public), (n,), generator=self.gen)]

    def _encode(self, x: Tensor) -> Tensor:
        return self.pilot(x.reshape(len(x), *self.shape)).reshape(len(x), -1)

    def _autoencoder_step(self, n: int) -> None:
        x = self._batch(n)
        loss = nn.functional.mse_loss(self.decoder(self._encode(x)), x)
        self.ae_opt.zero_grad(set_to_none=True)
        loss.backward(inputs=[p for g in self.ae_opt.param_groups for p in g["params"]])
        self.ae_opt.step()

    def adversarial(self, z: Tensor) -> Tensor:
        """One attacker step on received activations ``z``: the gradient it returns for them."""
        flat = z.detach().float().reshape(len(z), -1)
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Using backward\\(\\) with create_graph", UserWarning)
            self._autoencoder_step(len(z))
            for _ in range(self.config.critic_steps):
                with torch.no_grad():
                    real = self._encode(self._batch(len(z)))
                mix = torch.rand(len(z), 1, generator=self.gen)
                between = (mix * real + (1 - mix) * flat).requires_grad_(True)
                # (backward with inputs, not autograd.grad: the engine may count this step's FLOPs, whose module
                # hooks refuse autograd.grad)
                self.critic(between).sum().backward(inputs=[between], create_graph=True)
                penalty = ((between.grad.norm(dim=1) - 1) ** 2).mean()
                loss = self.critic(flat).mean() - self.critic(real).mean() + self.config.gradient_penalty * penalty
                self.critic_opt.zero_grad(set_to_none=True)
                loss.backward(inputs=list(self.critic.parameters()))
                self.critic_opt.step()
            target = flat.clone().requires_grad_(True)
            (-self.critic(target).mean()).backward(inputs=[target])
            grad = target.grad
        self.steps += 1
        return (self.config.scale * grad).reshape(z.shape).to(z.dtype)

    def install(self, module: nn.Module) -> None:
        """Wrap ``module`` (the server's segment taking the client's activations): its output is the honest one, the
        gradient its input gets back is :meth:`adversarial`'s (training steps only)."""
        honest = module.forward
        hijacker = self

        def forward(self: nn.Module, z: Tensor, *rest: Tensor) -> Any:
            if not (torch.is_grad_enabled() and self.training and z.requires_grad):
                return honest(z, *rest)
            hijacker.seen += 1
            if hijacker.seen <= hijacker.config.start:
                return honest(z, *rest)
            return honest(_Hijack.apply(z, hijacker.adversarial(z)), *rest)

        module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]

    @torch.no_grad()
    def invert(self, z: Tensor) -> Tensor:
        """The decoder's reconstruction of the rows whose activations are ``z`` (flat rows)."""
        return self.decoder(z.float().reshape(len(z), -1))


class _seeded:
    """Torch's global generator seeded for a block and put back afterwards (the runs' streams are untouched)."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self) -> None:
        self.state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        torch.random.set_rng_state(self.state)


@dataclass
class Hijacked:
    """What an FSHA run left: the run (:class:`~splitlearn.tools.audit.active.harness.Attacked`), the attacker's
    state, the client and the wire attacked."""

    run: Attacked
    hijacker: Hijacker
    client: str
    segment: str
    wire: str


def _wire(plan: Plan, wire: str | None) -> Any:
    from ....core.graph import build_graph

    graph = build_graph(plan)
    found = [w for w in graph.wires if w.carries == "activation" and graph.raw_inputs(w.src)
             and (wire is None or wire in (w.name, w.src))]
    if len(found) != 1:
        names = [w.name for w in graph.wires if w.carries == "activation" and graph.raw_inputs(w.src)]
        raise ValueError(f"FSHA needs one activation wire computed from its sender's own data; "
                         f"{'name one of' if names else 'this plan has none'} {', '.join(names)}")
    return graph, found[0]


def hijack(plan: Plan | str | Path | dict, public: Tensor, *, wire: str | None = None, epochs: int | None = None,
           seed: int | None = None, config: FshaConfig = FshaConfig()) -> Hijacked:
    """Train ``plan`` with the receiver of ``wire`` (the only activation wire computed from its sender's own data,
    when None) replaced by an FSHA server holding ``public`` rows (shaped as the sender's input)."""
    if config.pilot not in ("plan", "fresh"):
        raise ValueError(f"FshaConfig.pilot: 'plan' or 'fresh', got {config.pilot!r}")
    checked = load_plan(plan).with_train(epochs=epochs, seed=seed)
    graph, w = _wire(checked, wire)
    node = graph.nodes[w.src]
    segment = node.inputs[0] if node.kind == "output" else w.src
    consumer = next(c for c in w.consumers if graph.nodes[c].kind == "segment")
    with _seeded(config.seed + 1):
        pilot = build_segment(checked, segment)  # every party derives initial weights from the plan's seed
        for m in pilot.modules() if config.pilot == "fresh" else ():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()  # the architecture from the plan, weights of the attacker's own
    hijacker = Hijacker(pilot, public, config)

    def install(participant: Any) -> None:
        hijacker.install(participant.party.modules[consumer])

    run = run_against(checked, w.dst_party, install)
    return Hijacked(run, hijacker, w.src_party, segment, w.name)


def reconstruction(result: Hijacked, rows: Tensor | None = None) -> dict[str, float]:
    """Reconstruction MSE of the client's rows (``rows``: positions into its aligned rows; all of them when None)
    through the decoder, from the activations the client's trained encoder gives them; and the MSE of the public
    rows' mean image, the baseline."""
    party = result.run.participants[result.client].party
    node = party.graph.raw_inputs(result.segment)[0]
    x = party.data[node] if rows is None else party.data[node][rows]
    encoder = party.modules[result.segment]
    was = encoder.training
    encoder.eval()
    with torch.no_grad():
        z = encoder(x)
    encoder.train(was)
    flat = x.float().reshape(len(x), -1)
    mse = float(((result.hijacker.invert(z) - flat) ** 2).mean())
    mean = result.hijacker.public.mean(dim=0, keepdim=True)
    baseline = float(((flat - mean) ** 2).mean())
    return {"mse": mse, "baseline": baseline, "ratio": mse / baseline if baseline else float("nan"),
            "attacker_steps": float(result.hijacker.steps)}


class FeatureSpaceHijacking(Attack):
    """FSHA as a registered (active) attack: the run's plan trained again with the server replaced; the auxiliary
    share of the sender's rows is the attacker's public data and the figure is on the other rows."""

    name = "fsha"
    title = "feature-space hijacking (Pasquini et al. 2021)"
    attacker = "server (malicious: returns gradients of its own)"
    needs = ("public rows of the client's domain (here the run's test rows, never trained on), the plan's architecture "
             "and the client's initial weights, which every party builds from the plan's seed (its pilot encoder)")
    active = True
    applies_to = "activation wires whose sender computes them from its own data and trains on the gradient back"
    figure = "reconstruction MSE of the client's other rows through the attacker's decoder"
    baseline = "the mean image of the public rows"
    paper = "MNIST: MSE 0.019 after 10,000 iterations (0.027 under NoPeek), Pasquini et al."

    def targets(self, run: RunFolder, settings: Settings) -> list[Target] | str:
        if run.per_client:
            return CLIENTS_RUN
        wires = own_data_wires(run.graph)
        found = [Target(w.dst_party, w.name, "the gradients it returns") for w in wires
                 if all(len(run.graph.nodes[c].inputs) == 1 for c in w.consumers if run.graph.nodes[c].kind == "segment")]
        if wires and not found:
            return ("the receiving segment takes several inputs (several clients' wires, or the parts of a "
                    "multi-tensor wire): this FSHA server hijacks a segment fed by one tensor of one client")
        return found or "no activation wire is computed from its sender's own data"

    def attack(self, run: RunFolder, target: Target, settings: Settings, out_dir: Path) -> dict[str, Any]:
        from ....run.report import RunError

        w = next(x for x in run.graph.wires if x.name == target.wire)
        node = run.graph.raw_inputs(w.src)[0]
        setup = run.setup(w.src_party)
        x = setup.inputs[node]  # every row of the sender's, in the run's order
        public = torch.as_tensor(np.asarray(setup.splits.test))  # the server's public rows: never trained on
        if len(public) < 2:
            raise ValueError("the run has fewer than 2 test rows: the hijacking server's public rows are those")
        try:
            result = hijack(run.plan, x[public], wire=w.name, config=FshaConfig(seed=settings.seed))
        except RunError as e:  # the sender's hijack_guard stopped it
            if "look hijacked" not in str(e):
                raise ValueError(f"the run with the hijacking server failed: {e}") from None
            return {"value": None, "verdict": MILD, "stopped": str(e),
                    "figure_text": f"stopped by {w.src_party}'s hijack_guard: the server held the activations of the "
                                   "training batches before the stop (with the client's initial encoder as its pilot, "
                                   "its decoder inverts those as well as a finished hijack's)"}
        got = reconstruction(result, torch.as_tensor(np.asarray(setup.splits.train)))
        verdict = LEAKS if got["ratio"] <= MSE_LEAKS else MILD if got["ratio"] <= MSE_MILD else NONE
        out = {"value": got["mse"], "verdict": verdict, **got,
               "figure_text": f"MSE {got['mse']:.4f} against the mean image's {got['baseline']:.4f}"}
        if verdict != NONE:
            out["remedy"] = (f"{plan_table(w.src)} hijack_guard = true: the client stops training when the gradients "
                             "it gets back do not depend on its labels")
        return out


register_attack(FeatureSpaceHijacking())
