"""The commands that look at plans and runs: inspect, audit, report, cost, compare."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..core.load import load_plan
from ..core.specs import PlanError
from . import _bar, _fail, _fresh, app, console, err


@app.command()
def inspect(plan: Path = typer.Argument(..., help="plan file (.toml)"),
            png: Optional[Path] = typer.Option(None, help="draw the topology (wires with their shapes and bytes per "
                                               "sample) into this PNG file"),
            check: bool = typer.Option(True, help="also load the data and dry-run one sample through the plan")) -> None:
    """Print PLAN's parties, stages and wires, flag label wires, and draw its topology."""
    from ..core.graph import build_graph
    from ..run.setup import label_notes, prepare
    from ..tools.viz import describe, draw_topology

    try:
        p = load_plan(plan)
        prepared = prepare(p, check_only=True) if check else None
        shapes = prepared[2] if prepared else {}
    except PlanError as e:
        _fail(str(e))
    graph = build_graph(p)
    console.print(describe(graph), highlight=False, markup=False)
    for note in label_notes(prepared[1]) if prepared else []:
        console.print(note, highlight=False, markup=False)
    if shapes:
        console.print("wire shapes (from a dry run on one sample; each tensor of a tuple or dict output on its own "
                      "wire):")
    wires = {w.name: w for w in graph.wires}
    for wire, (dtype, shape) in shapes.items():
        console.print(_wire_line(wires.get(wire), wire, dtype, shape), highlight=False, markup=False)
    from ..clients.layout import describe_schedule

    if describe_schedule(p):
        console.print(describe_schedule(p), highlight=False, markup=False)
    if png is None:
        console.print("(--png FILE draws the topology)", style="dim")
        return
    draw_topology(graph, png, shapes=shapes)
    console.print(f"drew {png}")


def _wire_line(w, name: str, dtype: str, shape: tuple[int, ...]) -> str:
    """One wire of ``inspect``: its dtype, row shape (a varying dimension with its bound), bytes a row, and
    whether a gradient comes back (an integer activation carries none, and travels exactly, undefended)."""
    import torch

    from ..wire.codec import floating

    bounds = dict(w.vary) if w is not None else {}
    dims = [f"{n} (1..{bounds[d + 1]})" if d + 1 in bounds else str(n) for d, n in enumerate(shape)]
    size = torch.empty((), dtype=getattr(torch, dtype)).element_size() if hasattr(torch, dtype) else 4
    row = size * math.prod(shape)
    most = size * math.prod(bounds.get(d + 1, n) for d, n in enumerate(shape))
    text = f"  {name}: {dtype} [{', '.join(['batch', *dims])}]  {row} B a row" + (f" (up to {most} B)" if most != row
                                                                                 else "")
    integer = w is not None and w.carries == "activation" and not floating(dtype)
    return text + (" (exact, no gradient: codecs and defenses act on floating tensors only)" if integer else "")


@app.command()
def audit(target: Path = typer.Argument(..., help="a run folder (--out of 'splitlearn run'), or a plan file with --sweep"),
          sweep: Optional[List[str]] = typer.Option(None, "--sweep", help="PARAM=V1,V2,...: train the plan once per "
                                                    "value and audit each run (nopeek.alpha, noise.sigma, "
                                                    "label_protection.strength); given twice or more: every "
                                                    "combination (a grid)"),
          wire: Optional[str] = typer.Option(None, help="wire to set in a sweep (name or source node, or 'all'); "
                                             "default: the first wire the setting applies to"),
          out: Optional[Path] = typer.Option(None, help="sweep: folder for the runs, sweep.json/.md/.png (default "
                                             "runs/sweep); run: also copy the audit there"),
          aux_fraction: float = typer.Option(0.1, help="share of the recorded rows the inversion attacker knows"),
          epochs: Optional[int] = typer.Option(None, min=1, help="sweep: training epochs (default: the plan's)"),
          decoder_epochs: int = typer.Option(200, min=1, help="training epochs of the inversion decoder"),
          seed: int = typer.Option(0, help="seed of the attacks"),
          attack: Optional[List[str]] = typer.Option(None, "--attack", help="run this registered attack only (given "
                                                     "twice or more: these); default: every passive one that applies "
                                                     "(an active one, which trains the plan again, runs when named)"),
          known_labels: Optional[int] = typer.Option(None, min=2, help="model completion: labelled rows the attacker "
                                                     "holds (default 4 a class, at least 20)"),
          attribute: Optional[str] = typer.Option(None, help="attribute probe: the sensitive attribute, "
                                                  "PARTY.FIELD or PARTY.FIELD:COLUMN of a sender's data"),
          force: bool = typer.Option(False, "--force", help="sweep: write over an --out folder that holds files"),
          ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS", help="sweep: every setting as a Ray "
                                            "task in parallel: ADDRESS of a cluster or 'local' (pip install "
                                            "'splitlearn[ray]')")) -> None:
    """Audit what each party of a finished run could learn (distance correlation, model inversion,
    label leakage, model completion, labels by clustering, attribute inference: every registered attack
    that applies, or --attack NAME); or, with --sweep, train a plan at several strengths of a defense and
    tabulate accuracy against leakage."""
    import shutil

    from ..tools.audit import AuditError, audit_run, parse_sweep
    from ..tools.audit import sweep as do_sweep
    from ..run.report import RunError

    sweep = sweep or None
    if ray is not None and sweep is None:
        _fail("--ray runs the settings of a sweep as Ray tasks: give --sweep too")

    if not 0 < aux_fraction < 1:
        _fail(f"--aux-fraction must be between 0 and 1 (exclusive), got {aux_fraction}")
    try:
        if sweep is None:
            if target.is_file():
                _fail(f"{target} is a plan file: give --sweep PARAM=V1,V2,... to train and audit it, or give the "
                      "--out folder of a finished run")
            if epochs is not None:
                _fail("--epochs sets the training epochs of a --sweep; for the inversion decoder use --decoder-epochs")
            if wire is not None:
                _fail("--wire chooses the wire a --sweep sets; a run's audit covers every wire")
            with console.status("auditing", spinner="dots") as status:
                result = audit_run(target, aux_fraction=aux_fraction, seed=seed, epochs=decoder_epochs,
                                   progress=lambda text: status.update(text), attacks=attack or None,
                                   known_labels=known_labels, attribute=attribute)
        else:
            if target.is_dir():
                _fail(f"{target} is a folder: --sweep trains a plan, give the plan file (.toml)")
            if attack or known_labels is not None or attribute is not None:
                _fail("--attack, --known-labels and --attribute choose the attacks of a run's audit; a --sweep "
                      "tabulates the per-wire measures")
            grid = dict(parse_sweep(text) for text in sweep)
            if len(grid) < len(sweep):
                _fail("--sweep: a parameter is given twice; give each once, with all its values")
            dest = out or Path("runs/sweep")
            _fresh(dest, force)
            with _bar(False) as bar:
                task = bar.add_task("sweep", total=math.prod(len(v) for v in grid.values()))
                started: list[str] = []

                def progress(text: str) -> None:  # told as each setting starts
                    if started:
                        bar.update(task, advance=1)
                    started.append(text)
                    bar.update(task, description=f"sweep: {escape(text.split(':')[0])}")

                result = do_sweep(target, grid, None, dest, wire=wire, epochs=epochs, aux_fraction=aux_fraction,
                                  seed=seed, decoder_epochs=decoder_epochs, progress=progress, ray=ray)
                bar.update(task, advance=1)
    except (AuditError, PlanError) as e:
        _fail(str(e))
    except RunError as e:
        _fail(str(e), code=1)

    if sweep is not None:
        from ..tools.audit.summary import sweep_summary
        from ..tools.audit.sweep import setting_name

        failed = [r for r in result["rows"] if r.get("failed")]
        for r in failed:
            err.print(f"[bold red]setting {setting_name(r['values'])} failed:[/] {escape(r['failed'])}",
                      highlight=False)
        columns, rows = sweep_summary(result)
        table = Table(title=f"{result['param']} on {', '.join(result['wires'])} ({result['plan']}, "
                            f"{result['epochs']} epochs)")
        for col in columns:
            table.add_column(col, justify="right", no_wrap=col in result["params"])
        for row in rows:
            table.add_row(*(("[red]failed[/]" if i == len(result["params"]) else "") if v is None else v
                            for i, v in enumerate(row)))
        console.print(table)
        if len(result["wires"]) > 1:
            console.print("leakage figures: the worst over the wires (largest dCor, SSIM, AUCs; smallest MSE)")
        console.print(f"wrote {dest / 'sweep.json'}, {dest / 'sweep.md'} and {dest / 'sweep.png'}")
        if failed:
            raise typer.Exit(1)
        return

    from ..tools.audit.summary import audit_summary

    acc = result.get("test_accuracy")
    console.print(f"[bold]{result['plan']}[/]" + (f": test accuracy {acc:.4f}" if acc is not None else ""))
    summary = audit_summary(result)
    table = Table(title="what each party could learn from what it received")
    for col in ("wire", "attacker", "attack", "figure", "verdict"):
        table.add_column(col, overflow="fold")
    for wire_name, attacker, attack, fig, verdict in summary.rows:
        colour = {"leaks": "red", "mild": "yellow"}.get(verdict, "green")
        table.add_row(wire_name, attacker, attack, fig, f"[{colour}]{verdict}[/]" if verdict else "see the notes below")
    console.print(table)
    console.print("thresholds: " + "; ".join(summary.thresholds), style="dim", highlight=False)
    for text in summary.explanations:
        console.print(f"[bold yellow]note:[/] {escape(text)}", highlight=False)
    for n in summary.notes:
        console.print(f"[dim]{escape(n)}[/]", highlight=False)
    for line in summary.per_client:
        console.print(line, highlight=False)
    folder = Path(result["run"]) / "audit"
    if out is not None:
        shutil.copytree(folder, out, dirs_exist_ok=True)
        folder = out
    console.print(f"wrote {folder / 'audit.json'}")


@app.command()
def report(folder: Path = typer.Argument(..., help="a run folder (--out of 'splitlearn run') or a compare folder"),
           out: Optional[Path] = typer.Option(None, help="where to write the page [default: FOLDER/report.html]")
           ) -> None:
    """Write one self-contained report.html of a run: topology, curves, bytes and FLOPs per party,
    wires and their defenses, privacy spent, and the audit when there is one."""
    from ..tools.report import ReportError, write_report

    try:
        path = write_report(folder, out)
    except ReportError as e:
        _fail(str(e))
    console.print(f"wrote {path} (open it in a browser; it needs no network)")


@app.command()
def cost(model: str = typer.Option("vgg16", help="vgg16 or resnet50 (CIFAR-style, from the model zoo)"),
         dataset: str = typer.Option("cifar10", help="cifar10 or cifar100 (shapes only: no data is read)"),
         clients: str = typer.Option("100,500", help="comma-separated client counts"),
         cut: int = typer.Option(1, min=1, help="the client holds layers [0, cut); 1 = after the first convolution"),
         epochs: Optional[float] = typer.Option(None, min=0.0, help="epochs (default: fitted to the seed's figures)"),
         as_json: bool = typer.Option(False, "--json", help="print the full result as JSON")) -> None:
    """Predict per-client FLOPs and bytes of split learning, FedAvg and large-batch SGD from shapes
    alone, beside the seed's table, with every assumption stated."""
    from ..tools.costmodel import compare, format_table

    try:
        counts = [int(c) for c in clients.split(",") if c.strip()]
        if not counts or min(counts) < 1:
            raise ValueError
    except ValueError:
        _fail(f"--clients {clients!r}: expected positive integers separated by commas, e.g. 100,500")
    try:
        result = compare(model, dataset, counts, cut, epochs)
    except ValueError as e:
        _fail(str(e))
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))


@app.command("compare")
def compare_cmd(plan: Path = typer.Argument(..., help="a split plan (.toml): one party holds the data"),
                clients: Optional[int] = typer.Option(None, min=1, help="number of clients (default: the plan's "
                                                      "[clients] count, else 10)"),
                methods: str = typer.Option(",".join(("sequential", "splitfed_v2", "fedavg", "large_batch",
                                                      "centralized")),
                                            help="comma-separated: sequential, splitfed_v1, splitfed_v2, independent, "
                                                 "fedavg, large_batch, centralized"),
                dirichlet: Optional[float] = typer.Option(None, min=0.0, help="non-iid: Dirichlet alpha over labels "
                                                                             "(default: the plan's partition, or iid)"),
                epochs: Optional[int] = typer.Option(None, min=1, help="override the plan's epochs"),
                out: Path = typer.Option(Path("runs/compare"), help="folder for METHOD/result.json, compare.json/.md "
                                                                    "and the two pictures"),
                force: bool = typer.Option(False, "--force", help="write over an --out folder that holds files"),
                ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS", help="train the methods as Ray "
                                                  "tasks in parallel: ADDRESS of a cluster or 'local' (pip install "
                                                  "'splitlearn[ray]')")) -> None:
    """Train split learning and its baselines on the same model, data and partition; tabulate
    per-client TFLOPs, GB and accuracy beside the cost model's prediction, and draw the seed's
    two pictures (accuracy vs per-client computation, per-client bytes)."""
    from ..clients.baselines import METHODS
    from ..tools.compare import format_compare, run_compare
    from ..run.report import RunError

    _fresh(out, force)
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in chosen if m not in METHODS]
    if not chosen or bad:
        _fail(f"--methods: unknown {bad or 'empty list'}; choose from {', '.join(METHODS)}")
    if dirichlet is not None and dirichlet <= 0:
        _fail("--dirichlet must be positive")
    partition = {"kind": "dirichlet", "alpha": dirichlet} if dirichlet is not None else None
    with _bar(False) as bar:
        task = bar.add_task("compare", total=len(chosen))
        seen: list[str] = []

        def progress(method: str) -> None:
            if seen:
                bar.update(task, advance=1)
            seen.append(method)
            bar.update(task, description=f"compare: {method}")

        try:
            table = run_compare(plan, clients, chosen, out=out, partition=partition, epochs=epochs, progress=progress,
                                ray=ray)
        except PlanError as e:
            _fail(str(e))
        except RunError as e:
            _fail(str(e), code=1)
        bar.update(task, advance=1)
    print(format_compare(table))
    console.print(f"wrote {out / 'compare.json'}, {out / 'compare.md'}, {out / 'accuracy_vs_computation.png'}, "
                  f"{out / 'bytes_per_client.png'}")
