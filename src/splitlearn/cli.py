"""The ``splitlearn`` command line: run, inspect, predict (and the network commands)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .plan import PlanError, load_plan

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Split learning: train, inspect and predict from plans of any configuration.")
console = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _human(n: float, unit: str = "") -> str:
    for prefix in ("", "k", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.3g} {prefix}{unit}".strip()
        n /= 1000
    return f"{n:.3g} E{unit}"


def _summary(result: dict) -> None:
    m = result["metrics"]
    if "test_accuracy" in m:
        console.print(f"[bold]test accuracy[/]: {m['test_accuracy']:.4f}")
    for task, t in m.get("tasks", {}).items():
        acc = f"accuracy {t['test_accuracy']:.4f}" if "test_accuracy" in t else f"test loss {t['test_loss']:.4f}"
        console.print(f"  task [cyan]{task}[/] (at {t['party']}): {acc}")
    table = Table(title="per party", show_lines=False)
    for col in ("party", "bytes sent", "bytes received", "FLOPs", "compute s", "wait s"):
        table.add_column(col, justify="right" if col != "party" else "left")
    for name, p in result["parties"].items():
        table.add_row(name, _human(p["bytes_sent"], "B"), _human(p["bytes_received"], "B"), _human(p["flops"]),
                      f"{p['compute_s']:.2f}", f"{p['wait_s']:.2f}")
    console.print(table)
    labels = [w for w in result["wires"] if w["carries"] == "label"]
    for w in labels:
        console.print(f"[yellow]label wire[/] {w['name']}: labels of {w['src']} travel to {w['dst']}")


def _bar(quiet: bool) -> Progress:
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    return Progress(*columns, console=console, disable=quiet)


@app.command()
def run(plan: Path = typer.Argument(..., help="plan file (.toml)"),
        epochs: Optional[int] = typer.Option(None, min=1, help="override the plan's epochs"),
        seed: Optional[int] = typer.Option(None, help="override the plan's seed"),
        out: Path = typer.Option(Path("runs/latest"), help="folder for result.json, plan.json and weights"),
        in_process: bool = typer.Option(False, "--in-process", help="simulate: every party in this process"),
        insecure: bool = typer.Option(False, "--insecure", help="no TLS between party processes (not recommended)"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar")) -> None:
    """Train PLAN: one process per party on loopback with mutual TLS (or --in-process);
    write OUT/result.json and each party's weights."""
    from .api import train_prepared
    from .runner import RunError, prepare, schedule

    try:
        p, setups, shapes = prepare(plan, epochs=epochs, seed=seed)
    except PlanError as e:
        _fail(str(e))
    total = sum(1 for _ in schedule(p, next(iter(setups.values())).splits))
    if insecure and not in_process:
        err.print("[bold yellow]warning:[/] --insecure: parties talk without TLS; anyone on the network can read "
                  "and impersonate them")
    with _bar(quiet) as bar:
        task = bar.add_task(f"{p.name}: epoch 1/{p.train.epochs}", total=total)

        def on_step(step) -> None:
            bar.update(task, advance=1, description=f"{p.name}: epoch {step.epoch + 1}/{p.train.epochs} {step.mode}")

        try:
            if in_process:
                result = train_prepared(p, setups, shapes, out=out, on_step=on_step)
            else:
                from .distributed import launch

                del setups  # each party process builds its own
                result = launch(plan, out, epochs=epochs, seed=seed, insecure=insecure, on_step=on_step)
        except RunError as e:
            for party, text in e.errors.items():
                err.print(f"[bold red]party {party} failed:[/] {text}", highlight=False)
            raise typer.Exit(1)
    _summary(result)
    console.print(f"wrote {out / 'result.json'}")


def _peers(values: list[str]) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, addr = v.partition("=")
        if not sep or not name or ":" not in addr:
            _fail(f"--peer {v!r}: expected NAME=HOST:PORT")
        out[name] = addr
    return out


@app.command()
def party(plan: Path = typer.Argument(..., help="plan file (.toml), the same at every party"),
          name: str = typer.Option(..., "--name", help="which party of the plan this process is"),
          certs: Optional[Path] = typer.Option(None, help="folder from 'splitlearn certs' (CA + this party's key)"),
          listen: Optional[str] = typer.Option(None, help="HOST:PORT to listen on (default: the plan's address)"),
          peer: list[str] = typer.Option([], help="NAME=HOST:PORT of a party to dial (repeatable)"),
          dial_out: list[str] = typer.Option([], "--dial-out", help="party that only dials out, e.g. behind a "
                                             "firewall (repeatable; give every party the same list)"),
          out: Optional[Path] = typer.Option(None, help="folder for this party's weights and report"),
          epochs: Optional[int] = typer.Option(None, min=1), seed: Optional[int] = typer.Option(None),
          insecure: bool = typer.Option(False, "--insecure", help="no TLS (explicit opt-in; a warning is printed)"),
          connect_timeout: float = typer.Option(60.0, help="seconds to reach every neighbour"),
          step_timeout: float = typer.Option(120.0, help="seconds to wait for a message before giving up"),
          progress: bool = typer.Option(False, "--progress", hidden=True),
          quiet: bool = typer.Option(False, "--quiet", "-q")) -> None:
    """Run one party of PLAN on this machine, talking to its neighbours over gRPC."""
    from .distributed import run_one_party
    from .results import write_json
    from .runner import RunError

    if certs is None and not insecure:
        _fail("give --certs DIR (made by 'splitlearn certs PLAN --out DIR'), or --insecure to run without TLS")
    if insecure:
        err.print("[bold yellow]warning:[/] --insecure: this party talks without TLS; peers are not authenticated")

    def on_step(step) -> None:
        print(f"step {step.id} {step.epoch} {step.mode}", flush=True)

    try:
        report = run_one_party(plan, name, certs=None if insecure else certs, listen=listen, peers=_peers(peer),
                               out=out, epochs=epochs, seed=seed, connect_timeout=connect_timeout,
                               step_timeout=step_timeout, on_step=on_step if progress else None, dial_out=dial_out)
    except Exception as e:  # noqa: BLE001 - every failure of a party is reported the same way
        text = str(e) if isinstance(e, (PlanError, RunError, RuntimeError, OSError, ValueError)) else repr(e)
        if out is not None:
            write_json(out / "parties" / name / "error.json", {"party": name, "error": text})
        _fail(f"party {name}: {text}", code=1)
    if not quiet:
        console.print(f"party {name} done: sent {_human(report.meter['bytes_sent'], 'B')}, "
                      f"received {_human(report.meter['bytes_received'], 'B')}, {_human(report.meter['flops'])} FLOPs")


@app.command()
def certs(plan: Path = typer.Argument(..., help="plan file (.toml)"),
          out: Path = typer.Option(..., help="folder for ca.pem and NAME.pem/NAME.key per party"),
          days: int = typer.Option(365, min=1, help="validity")) -> None:
    """Make a certificate authority and a key and certificate for every party of PLAN."""
    from .transport.tls import make_certs

    try:
        p = load_plan(plan)
    except PlanError as e:
        _fail(str(e))
    make_certs(list(p.parties), out, days=days)
    console.print(f"wrote a CA and certificates for {', '.join(p.parties)} to {out}")
    console.print("give each party only ca.pem and its own NAME.pem and NAME.key; keep ca.key offline")


@app.command()
def inspect(plan: Path = typer.Argument(..., help="plan file (.toml)"),
            png: Optional[Path] = typer.Option(None, help="where to draw the topology (default: PLAN-topology.png)"),
            check: bool = typer.Option(True, help="also load the data and dry-run one sample through the plan")) -> None:
    """Print PLAN's parties, stages and wires, flag label wires, and draw its topology."""
    from .graph import build_graph
    from .runner import prepare
    from .viz import describe, draw_topology

    try:
        p = load_plan(plan)
        shapes = prepare(p)[2] if check else {}
    except PlanError as e:
        _fail(str(e))
    graph = build_graph(p)
    console.print(describe(graph), highlight=False, markup=False)
    if shapes:
        console.print("wire shapes (from a dry run on one sample):")
    for wire, (dtype, shape) in shapes.items():
        console.print(f"  {wire}: {dtype} [batch, {', '.join(map(str, shape))}]", highlight=False, markup=False)
    target = png or Path(f"{plan.stem}-topology.png")
    draw_topology(graph, target)
    console.print(f"drew {target}")


@app.command()
def predict(run_dir: Path = typer.Argument(..., help="the --out folder of a finished run"),
            data: Optional[Path] = typer.Option(None, help="CSV of new rows (an 'id' column and feature columns); "
                                                "default: the run's test split"),
            id_column: str = typer.Option("id", help="id column of --data")) -> None:
    """Run a trained plan forward; predictions go to the party owning each head."""
    from .api import predict as do_predict
    from .data import DataError
    from .runner import RunError

    spec = {"dataset": "csv", "path": str(data.resolve()), "id_column": id_column} if data else None
    try:
        out = do_predict(run_dir, spec)
    except (PlanError, DataError) as e:
        _fail(str(e))
    except RunError as e:
        _fail(str(e), code=1)
    for task, r in out.items():
        path = run_dir / "parties" / r["party"] / "predictions.csv"
        console.print(f"task [cyan]{task}[/]: {len(r['ids'])} predictions delivered to [bold]{r['party']}[/] ({path})")


def main() -> None:  # pragma: no cover
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
