"""The ``splitlearn`` command line: run, inspect, predict (and the network commands)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .core.plan import PlanError
from .core.load import load_plan
from .tools.units import human as _human

# rich_markup_mode=None: help texts are plain (square brackets, as in pip install 'splitlearn[ray]', survive)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Split learning: train, inspect and predict from plans of any configuration.")
console = Console()
err = Console(stderr=True, soft_wrap=True)  # errors keep their paths whole (never folded at 80 columns)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"splitlearn {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="print the version and exit"),
             debug: bool = typer.Option(False, "--debug", help="show tracebacks and gRPC's own log lines")) -> None:
    """Split learning: train, inspect and predict from plans of any configuration."""
    _state["debug"] = debug
    if debug:
        os.environ["GRPC_VERBOSITY"] = "INFO"  # party processes inherit it
        logging.getLogger().setLevel(logging.DEBUG)


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def _with_ci(m: dict, key: str) -> str:
    ci = (m.get("ci95") or {}).get(key)
    return f"{m[key]:.4f}" + (f" (95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci else "")


def _summary(result: dict) -> None:
    m = result["metrics"]
    rows = f" on {m['test_rows']} test rows" if m.get("test_rows") else ""
    if "test_accuracy" in m:
        console.print(f"[bold]test accuracy[/]{rows}: {_with_ci(m, 'test_accuracy')}", highlight=False)
        names = {"test_roc_auc": "ROC AUC", "test_f1": "F1", "test_sensitivity": "sensitivity",
                 "test_specificity": "specificity", "test_ece": "calibration error (ECE)"}
        shown = [f"{label} {_with_ci(m, k)}" for k, label in names.items() if m.get(k) is not None]
        if shown:
            console.print("  " + ", ".join(shown), highlight=False)
    elif m.get("test_mae") is not None:
        names = {"test_mae": "MAE", "test_rmse": "RMSE", "test_r2": "R²"}
        shown = [f"{label} {_with_ci(m, k)}" for k, label in names.items() if m.get(k) is not None]
        console.print(f"[bold]test regression[/]{rows}: " + ", ".join(shown), highlight=False)
    sites = list(m.get("per_client", {}).items())
    if m.get("scored") and sites:  # a [clients] run: pooled over every site's test rows; each on its own
        console.print(f"  pooled over {len(sites)} clients' test rows; per client:", highlight=False)
        for c, e in sites[:12]:
            figs = [f"{label} {e[k]:.4f}" for k, label in (("test_accuracy", "accuracy"), ("test_roc_auc", "ROC AUC"),
                                                          ("test_sensitivity", "sensitivity"), ("test_mae", "MAE"))
                    if isinstance(e.get(k), float)]
            console.print(f"    {c} ({e['rows']} rows): {', '.join(figs)}", highlight=False)
    for task, t in m.get("tasks", {}).items():
        if "test_accuracy" in t:
            acc = f"accuracy {t['test_accuracy']:.4f}"
        else:
            acc = f"test loss {t['test_loss'][-1]:.4f}" if t["test_loss"] else "not evaluated"
        console.print(f"  task [cyan]{task}[/] (at {t['party']}): {acc}")
    table = Table(title="per party", show_lines=False)
    for col in ("party", "bytes sent", "bytes received", "FLOPs", "compute s", "wait s"):
        table.add_column(col, justify="right" if col != "party" else "left")
    rows = list(result["parties"].items())
    for name, p in rows[:12]:
        table.add_row(name, _human(p["bytes_sent"], "B"), _human(p["bytes_received"], "B"), _human(p["flops"]),
                      f"{p['compute_s']:.2f}", f"{p['wait_s']:.2f}")
    if len(rows) > 12:
        table.add_row(f"... {len(rows) - 12} more", "", "", "", "", "")
    console.print(table)
    if "per_client" in result:
        pc = result["per_client"]
        console.print(f"per client ({result['schedule']['kind']}, {result['schedule']['clients']} clients): "
                      f"{_human(pc['flops']['mean'])} FLOPs, {_human(pc['bytes']['mean'], 'B')} sent + received (mean)")
    for s in result.get("skipped", [])[:10]:
        err.print(f"[yellow]skipped[/] {s['client']} in round {s['round']} ({s['during']}): {escape(str(s['reason']))}")
    labels = [w for w in result["wires"] if w["carries"] == "label"]
    for w in labels:
        console.print(f"[yellow]label wire[/] {w['name']}: labels of {w['src']} travel to {w['dst']}")


_OUTPUTS = ("result.json", "plan.json", "report.html", "parties", "audit", "tensorboard", "mlruns", "compare.json",
            "compare.md", "sweep.json", "sweep.md", "sweep.png", "accuracy_vs_computation.png", "bytes_per_client.png")


def _fresh(out: Path, force: bool) -> None:
    """Nothing is overwritten silently: an ``--out`` folder that holds files needs ``--force``,
    which removes what an earlier run wrote there (an old audit must not describe the new run)
    and leaves anything else alone."""
    import shutil

    if out.is_file():
        _fail(f"--out {out} is a file; give a folder")
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not force:
        _fail(f"--out {out} already holds files (an earlier run?): give --force to replace that run, or another --out")
    for name in _OUTPUTS:
        old = out / name
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()


def _bar(quiet: bool) -> Progress:
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    return Progress(*columns, console=console, disable=quiet)


@app.command()
def run(plan: Path = typer.Argument(..., help="plan file (.toml)"),
        epochs: Optional[int] = typer.Option(None, min=1, help="override the plan's epochs"),
        seed: Optional[int] = typer.Option(None, help="override the plan's seed"),
        out: Optional[Path] = typer.Option(None, help="folder for result.json, plan.json and weights "
                                           "[default: runs/PLAN-NAME]"),
        force: bool = typer.Option(False, "--force", help="write over an --out folder that holds files"),
        resume: bool = typer.Option(False, "--resume", help="go on from the last checkpoint every party holds in --out"),
        in_process: bool = typer.Option(False, "--in-process", help="simulate: every party in this process"),
        insecure: bool = typer.Option(False, "--insecure", help="no TLS between party processes (not recommended)"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
        log: Optional[str] = typer.Option(None, help="stream metrics to tensorboard[:DIR] (default OUT/tensorboard) "
                                          "or mlflow[:URI] (default file:OUT/mlruns)"),
        link: Optional[str] = typer.Option(None, help="every connection through an emulated slow link: round trip "
                                           "and/or bandwidth, e.g. 50ms,100mbit"),
        ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS", help="each party process as a Ray actor: "
                                          "ADDRESS of a cluster (ray://HOST:10001, auto) or 'local' (pip install "
                                          "'splitlearn[ray]')")) -> None:
    """Train PLAN: one process per party on loopback with mutual TLS (or --in-process);
    write OUT/result.json and each party's weights."""
    from .api import train_prepared
    from .run.session import RunError
    from .run.setup import label_notes, prepare

    try:
        p, setups, shapes = prepare(plan, epochs=epochs, seed=seed)
    except PlanError as e:
        _fail(str(e))
    for note in label_notes(setups):
        err.print(f"[bold]note:[/] {escape(note)}", highlight=False)
    out = out or Path("runs") / plan.stem
    if resume and force:
        _fail("--resume goes on with the run in --out, --force replaces it: give one of them")
    if not resume:
        _fresh(out, force)
    elif not (out / "parties").is_dir():
        _fail(f"--resume: {out} holds no run to go on with (no parties/ folder)")
    if ray is not None and (in_process or link is not None):
        _fail("--ray places party processes on a Ray cluster: it cannot go with --in-process or --link")
    if link is not None:
        from .wire.transport.slowlink import parse_link

        if in_process:
            _fail("--link emulates a slow network between party processes: it cannot go with --in-process")
        try:
            parse_link(link)
        except ValueError as e:
            _fail(f"--link: {e}")
    if insecure and not in_process:
        err.print("[bold yellow]warning:[/] --insecure: parties talk without TLS; anyone on the network can read "
                  "and impersonate them")
    with _bar(quiet) as bar:
        task = bar.add_task(f"{p.name}: epoch 1/{p.train.epochs}", total=None)
        last = {"loss": None}

        def on_step(pr) -> None:  # a Progress: after each step, or each round of a [clients] schedule
            if pr.mode == "train" and pr.loss is not None:
                last["loss"] = pr.loss
            loss = "" if last["loss"] is None else f" train loss {last['loss']:.4f}"
            what = pr.mode if pr.unit == "step" else "round"
            bar.update(task, completed=pr.done, total=pr.total,
                       description=f"{p.name}: epoch {pr.epoch + 1}/{pr.epochs} {what}{loss}")

        try:
            if in_process:
                result = train_prepared(p, setups, shapes, out=out, on_step=on_step, log=log, resume=resume)
            elif ray is not None:
                from .launch.onray import launch_ray

                del setups
                if log is not None:
                    _fail("--log is not available with --ray yet: the parties' metrics are in OUT/result.json")
                result = launch_ray(plan, out, address=ray, epochs=epochs, seed=seed, insecure=insecure, checked=p,
                                    resume=resume)
            else:
                from .launch.processes import launch

                del setups  # each party process builds its own
                result = launch(plan, out, epochs=epochs, seed=seed, insecure=insecure, on_step=on_step, checked=p,
                                log=log, resume=resume, link=link)
        except PlanError as e:
            _fail(str(e))
        except RunError as e:
            for party, text in e.errors.items():
                err.print(f"[bold red]party {party} failed:[/] {text}", highlight=False)
            raise typer.Exit(1) from None
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
          step_timeout: Optional[float] = typer.Option(None, min=0.001, help="seconds a step may take as a whole "
                                                       "(however many messages arrive meanwhile) before this party "
                                                       "gives up [default: 120; with clients: clients.timeout]"),
          max_message_mb: float = typer.Option(256.0, min=0.001, help="largest message (and decoded tensor) a peer may "
                                               "send, in MiB"),
          progress: bool = typer.Option(False, "--progress", hidden=True),
          quiet: bool = typer.Option(False, "--quiet", "-q"),
          log: Optional[str] = typer.Option(None, help="stream the metrics of the losses this party computes to "
                                            "tensorboard[:DIR] or mlflow[:URI]"),
          data: Optional[Path] = typer.Option(None, help="this party's own rows (.csv, .parquet, .npz, a folder of "
                                              "images or MNIST files); wins over the plan's data settings"),
          resume: bool = typer.Option(False, "--resume", help="go on from the last checkpoint in --out that every "
                                      "party holds (start every party with --resume)"),
          rejoin_wait: Optional[float] = typer.Option(None, "--rejoin-wait", min=0.0, help="[clients] coordinator: "
                                                      "seconds to wait for a failed party to come back as a new "
                                                      "process [default: the plan's reconnect_timeout; 0: skip it "
                                                      "at once]")) -> None:
    """Run one party of PLAN on this machine, talking to its neighbours over gRPC."""
    from .launch.processes import progress_line, run_one_party
    from .wire.messages import Limits
    from .launch.results import write_json
    from .run.session import RunError

    if certs is None and not insecure:
        _fail("give --certs DIR (made by 'splitlearn certs PLAN --out DIR'), or --insecure to run without TLS")
    if insecure:
        err.print("[bold yellow]warning:[/] --insecure: this party talks without TLS; peers are not authenticated")

    def on_step(pr) -> None:
        print(progress_line(pr), flush=True)

    try:
        report = run_one_party(plan, name, certs=None if insecure else certs, listen=listen, peers=_peers(peer),
                               out=out, epochs=epochs, seed=seed, connect_timeout=connect_timeout,
                               step_timeout=step_timeout, on_step=on_step if progress else None, dial_out=dial_out,
                               limits=Limits(message_bytes=int(max_message_mb * 2**20),
                                             tensor_bytes=int(max_message_mb * 2**20)), log=log, data=data,
                               resume=resume, rejoin_wait=rejoin_wait)
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
    from .wire.transport.tls import make_certs

    try:
        p = load_plan(plan)
    except PlanError as e:
        _fail(str(e))
    from .clients.layout import Topology

    names = Topology.of(p).names  # with [clients]: every client and role
    make_certs(names, out, days=days)
    shown = ", ".join(names[:8]) + (f" ... ({len(names)} in all)" if len(names) > 8 else "")
    console.print(f"wrote a CA and certificates for {shown} to {out}")
    console.print("give each party only ca.pem and its own NAME.pem and NAME.key; keep ca.key offline")


@app.command()
def inspect(plan: Path = typer.Argument(..., help="plan file (.toml)"),
            png: Optional[Path] = typer.Option(None, help="draw the topology (wires with their shapes and bytes per "
                                               "sample) into this PNG file"),
            check: bool = typer.Option(True, help="also load the data and dry-run one sample through the plan")) -> None:
    """Print PLAN's parties, stages and wires, flag label wires, and draw its topology."""
    from .core.graph import build_graph
    from .run.setup import label_notes, prepare
    from .tools.viz import describe, draw_topology

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
        console.print("wire shapes (from a dry run on one sample):")
    for wire, (dtype, shape) in shapes.items():
        console.print(f"  {wire}: {dtype} [batch, {', '.join(map(str, shape))}]", highlight=False, markup=False)
    if p.clients is not None:
        from .clients.layout import coordinator_of, federation_of

        c = p.clients
        console.print(f"clients: {c.count} x {c.template!r} ({c.template}-1 ... {c.template}-{c.count}), "
                      f"schedule {c.schedule}" + (f", hand-off {c.handoff}" if c.schedule == "sequential" else
                                                  f", federation {federation_of(p)}")
                      + f", partition {c.partition.kind}; coordinator {coordinator_of(p)}; "
                      f"a client silent for {c.timeout:g} s is skipped", highlight=False, markup=False)
    if png is None:
        console.print("(--png FILE draws the topology)", style="dim")
        return
    draw_topology(graph, png, shapes=shapes)
    console.print(f"drew {png}")


@app.command()
def predict(run_dir: Path = typer.Argument(..., help="the --out folder of a finished run"),
            data: list[str] = typer.Option([], help="new rows: NAME=FILE for each party that holds data "
                                           "(repeatable; its columns as at training), or one FILE for a plan whose "
                                           "data one party holds; default: the run's test split"),
            id_column: Optional[str] = typer.Option(None, help="id column of the files (default: as at training)")) -> None:
    """Run a trained plan forward; predictions (the class and each class's probability) go to the
    party owning each head."""
    from .api import predict as do_predict
    from .data import DataError
    from .run.session import RunError

    spec: dict | None = None
    try:
        if data:
            spec = _party_files(run_dir, data, id_column)
        out = do_predict(run_dir, spec)
    except (PlanError, DataError) as e:
        _fail(str(e))
    except RunError as e:
        _fail(str(e), code=1)
    for party, ids in next(iter(out.values()), {}).get("unmatched", {}).items():
        err.print(f"[yellow]not matched[/]: {len(ids)} of {party}'s rows have ids that not every party holds, so "
                  f"they are not predicted (first: {escape(str(ids[:5]))})", highlight=False)
    for task, r in out.items():
        path = run_dir / "parties" / r["party"] / "predictions.csv"
        console.print(f"task [cyan]{task}[/]: {len(r['ids'])} predictions delivered to [bold]{r['party']}[/] ({path})")


def _party_files(run_dir: Path, given: list[str], id_column: str | None) -> dict:
    """``--data NAME=FILE`` (or one FILE for the one party that holds data) as DataSpecs per party."""
    from .launch.results import load_run_plan
    from .run.setup import holds_data, party_file

    if not (run_dir / "plan.json").is_file():
        raise PlanError("not a run folder: plan.json is missing", file=run_dir,
                        hint="give the --out folder of a finished 'splitlearn run'")
    plan = load_run_plan(run_dir)
    holders = [p for p in plan.parties if holds_data(plan, p)]
    out: dict = {}
    for item in given:
        name, sep, file = item.partition("=")
        if not sep:
            if len(given) > 1 or len(holders) > 1:
                raise PlanError(f"--data {item!r}: several parties hold data ({holders}); say whose each file is",
                                entry="--data", hint="--data NAME=FILE, once per party")
            name, file = holders[0], item
        if name not in plan.parties:
            raise PlanError(f"--data {item!r}: no party {name!r}", entry="--data", hint=f"parties are {holders}")
        if name in out:
            raise PlanError(f"--data names party {name!r} twice", entry="--data")
        if not Path(file).expanduser().exists():
            raise PlanError(f"--data {item!r}: no such file or folder {str(Path(file).expanduser().resolve())!r}",
                            entry="--data")
        spec = party_file(plan, name, file)
        if id_column is not None:
            spec = spec.model_copy(update={"id_column": id_column})
        out[name] = spec
    return out


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
          force: bool = typer.Option(False, "--force", help="sweep: write over an --out folder that holds files"),
          ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS", help="sweep: every setting as a Ray "
                                            "task in parallel: ADDRESS of a cluster or 'local' (pip install "
                                            "'splitlearn[ray]')")) -> None:
    """Audit what each party of a finished run could learn (distance correlation, model inversion,
    label leakage); or, with --sweep, train a plan at several strengths of a defense and tabulate
    accuracy against leakage."""
    import shutil

    from .tools.audit import AuditError, audit_run, parse_sweep
    from .tools.audit import sweep as do_sweep
    from .run.session import RunError

    sweep = sweep or None
    if ray is not None and sweep is None:
        _fail("--ray runs the settings of a sweep as Ray tasks: give --sweep too")

    def num(v) -> str:
        return "-" if v is None else f"{v:.3f}"

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
                                   progress=lambda text: status.update(text))
        else:
            if target.is_dir():
                _fail(f"{target} is a folder: --sweep trains a plan, give the plan file (.toml)")
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
        from .tools.audit.sweep import FIGURES, setting_name

        failed = [r for r in result["rows"] if r.get("failed")]
        for r in failed:
            err.print(f"[bold red]setting {setting_name(r['values'])} failed:[/] {escape(r['failed'])}",
                      highlight=False)
        params = result["params"]

        keys = [k for k in FIGURES if any(r.get(k) is not None for r in result["rows"])]
        dp = any("delta" in r for r in result["rows"])
        table = Table(title=f"{result['param']} on {', '.join(result['wires'])} ({result['plan']}, "
                            f"{result['epochs']} epochs)")
        for col in (*(["value"] if len(params) == 1 else params), "test accuracy", *(FIGURES[k] for k in keys),
                    *(["epsilon"] if dp else [])):
            table.add_column(col, justify="right", no_wrap=col in params)
        for r in result["rows"]:
            setting = [f"{r['values'][p]:g}" for p in params]
            if r.get("failed"):
                table.add_row(*setting, "[red]failed[/]", *([""] * (len(keys) + dp)))
                continue
            eps = ([("unbounded" if r.get("epsilon") is None else f"{r['epsilon']:.3g}")] if dp else [])
            table.add_row(*setting, num(r["test_accuracy"]), *(num(r.get(k)) for k in keys), *eps)
        console.print(table)
        if len(result["wires"]) > 1:
            console.print("leakage figures: the worst over the wires (largest dCor, SSIM, AUCs; smallest MSE)")
        console.print(f"wrote {dest / 'sweep.json'}, {dest / 'sweep.md'} and {dest / 'sweep.png'}")
        if failed:
            raise typer.Exit(1)
        return

    acc = result.get("test_accuracy")
    console.print(f"[bold]{result['plan']}[/]" + (f": test accuracy {acc:.4f}" if acc is not None else ""))
    table = Table(title="what each party could learn from what it received")
    for col in ("wire", "attacker", "attack", "figure", "verdict"):
        table.add_column(col, overflow="fold")
    labels = {"distance_correlation": "distance correlation", "inversion": "model inversion",
              "label_leakage": "labels from gradients", "labels_exposed": "labels on the wire"}
    notes = []
    for name, w in result["wires"].items():
        inv, leak = w.get("inversion") or {}, w.get("label_leakage") or {}
        if not w.get("verdicts"):
            table.add_row(name, w["receiver"], "none applies", "-", "see the notes below")
        for what, v in w.get("verdicts", {}).items():
            if what == "inversion":
                fig = f"MSE {inv['mse']:.4f} vs {inv['mse_mean_guess']:.4f} by guessing" + (
                    f", SSIM {inv['ssim']:.2f}" if inv.get("ssim") is not None else "")
            elif what == "label_leakage":
                fig = ", ".join(f"{k} AUC {leak[k + '_auc']:.3f}" for k in ("norm", "direction")
                                if leak.get(k + "_auc") is not None)
            elif what == "labels_exposed":
                fig = f"{100 * v['value']:.1f}% exact"
            else:
                fig = f"{v['value']:.3f}"
            attacker = w["sender"] if what == "label_leakage" else w["receiver"]
            colour = {"leaks": "red", "mild": "yellow"}.get(v["verdict"], "green")
            table.add_row(name, attacker, labels[what], fig, f"[{colour}]{v['verdict']}[/]")
        why_not: dict[str, list[str]] = {}
        for what, why in (w.get("why_not") or {}).items():
            why_not.setdefault(why, []).append(what.replace("_", " "))
        notes += [f"{name}: no {' or '.join(whats)}: {why}" for why, whats in why_not.items()]
        if inv.get("ssim_note"):
            notes.append(f"{name}: {inv['ssim_note']}")
        if leak.get("note"):
            notes.append(f"{name}: {leak['note']}")
    console.print(table)
    console.print("thresholds: " + "; ".join(result.get("thresholds", {}).values()), style="dim", highlight=False)
    for text in result.get("explanations", []):
        console.print(f"[bold yellow]note:[/] {escape(text)}", highlight=False)
    for n in notes:
        console.print(f"[dim]{escape(n)}[/]", highlight=False)
    for name in result["wires"]:  # [clients]: what each client's own traffic gives away
        per = {c: a["wires"].get(name, {}).get("distance_correlation") for c, a in result.get("clients", {}).items()}
        if any(v is not None for v in per.values()):
            console.print(f"{name}: distance correlation per client: " + ", ".join(f"{c} {num(v)}" for c, v in per.items()),
                          highlight=False)
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
    from .tools.report import ReportError, write_report

    try:
        path = write_report(folder, out)
    except ReportError as e:
        _fail(str(e))
    console.print(f"wrote {path} (open it in a browser; it needs no network)")


@app.command("link")
def link_cmd(to: str = typer.Option(..., "--to", help="HOST:PORT to relay to (a party that listens)"),
             listen: str = typer.Option("127.0.0.1:0", help="HOST:PORT to listen on (port 0: any free port)"),
             rtt: str = typer.Option("50ms", help="round trip, e.g. 20ms"),
             bandwidth: Optional[str] = typer.Option(None, help="each way, e.g. 100mbit (default: unlimited)")) -> None:
    """Relay TCP connections to --to through an emulated slow link (delay and bandwidth each way),
    to try a deployment's link before there is one: point a party's --peer at the address shown."""
    from .wire.transport.slowlink import SlowLink, parse_link

    try:
        delay, _ = parse_link(rtt)
        _, bw = parse_link(bandwidth) if bandwidth else (0.0, None)
        host, port = to.rsplit(":", 1)
        lhost, lport = listen.rsplit(":", 1)
        relay = SlowLink((host, int(port)), rtt=delay, bandwidth=bw, listen=(lhost, int(lport)))
    except ValueError as e:
        _fail(f"{e} (--to and --listen are HOST:PORT)")
    try:
        relay.start()
    except OSError as e:
        _fail(f"cannot listen on {listen}: {e}")
    console.print(f"relaying {lhost}:{relay.port} -> {to} at {delay * 1e3:g} ms round trip, "
                  f"{'unlimited' if bw is None else f'{bw / 1e6:g} Mbit/s'} each way (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        relay.stop()


@app.command()
def cost(model: str = typer.Option("vgg16", help="vgg16 or resnet50 (CIFAR-style, from the model zoo)"),
         dataset: str = typer.Option("cifar10", help="cifar10 or cifar100 (shapes only: no data is read)"),
         clients: str = typer.Option("100,500", help="comma-separated client counts"),
         cut: int = typer.Option(1, min=1, help="the client holds layers [0, cut); 1 = after the first convolution"),
         epochs: Optional[float] = typer.Option(None, min=0.0, help="epochs (default: fitted to the seed's figures)"),
         as_json: bool = typer.Option(False, "--json", help="print the full result as JSON")) -> None:
    """Predict per-client FLOPs and bytes of split learning, FedAvg and large-batch SGD from shapes
    alone, beside the seed's table, with every assumption stated."""
    from .tools.costmodel import compare, format_table

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
    from .tools.compare import METHODS, format_compare, run_compare
    from .run.session import RunError

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


def main() -> None:  # pragma: no cover
    """The ``splitlearn`` command. Its process ends with ``os._exit`` once the command is done and its
    output flushed: interpreter finalization can deadlock on gRPC's call objects (a ``__del__`` waiting
    for a lock that a frozen daemon thread holds), and a party process must never outlive its run."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC's C core logs (E1202 ... add_port.cc) only with --debug
    from .run.allocator import tune_allocator

    tune_allocator()
    code = 1
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # a bug or an error without its own message: one line, the traceback with --debug
        if _state["debug"]:
            import traceback

            traceback.print_exc()
        else:
            err.print(f"[bold red]error:[/] {type(e).__name__}: {escape(str(e))}\n(run 'splitlearn --debug ...' to see "
                      "the traceback)", highlight=False)
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # closed, or a broken pipe: nothing more to say
                pass
        os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
