"""The commands that train and serve: run, party, certs, predict, link."""

from __future__ import annotations

from pathlib import Path
import time
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..core.load import load_plan
from ..core.specs import PlanError
from ..core.units import human as _human
from . import _bar, _fail, _fresh, app, console, err


def _with_ci(m: dict, key: str) -> str:
    ci = (m.get("ci95") or {}).get(key)
    return f"{m[key]:.4f}" + (f" (95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci else "")


def _summary(result: dict) -> None:
    m = result["metrics"]
    rows = f" on {m['test_rows']} test rows" if m.get("test_rows") else ""
    if m.get("test_tokens") is not None:  # a language model: per token
        ppl = f"perplexity {m['test_perplexity']:.3f}, " if m.get("test_perplexity") is not None else ""
        console.print(f"[bold]test loss[/] on {m['test_tokens']} tokens of {m.get('test_rows')} test rows: "
                      f"{m['test_loss']:.4f} ({ppl}next-token accuracy {m['test_accuracy']:.4f})", highlight=False)
    elif "test_accuracy" in m:
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
    per_token = [f"{w['name']} {'/'.join(f'{v:.1f}' for v in w['bytes_per_token'].values())}"
                 for w in result.get("wires", []) if w.get("bytes_per_token")]
    if per_token:  # text rows: padded per batch, so per real token
        console.print("  bytes per real token (forward/backward): " + ", ".join(per_token), highlight=False)
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
                                          "'splitlearn[ray]')"),
        status: bool = typer.Option(False, "--status", help="each party process serves its live status on a free "
                                    "loopback port (a page, /status.json, /metrics); the addresses are printed and "
                                    "kept in OUT/parties/NAME/status.url"),
        log_format: str = typer.Option("text", "--log-format", help="the party processes' logs (OUT/parties/NAME/"
                                       "party.log): text, or json lines")) -> None:
    """Train PLAN: one process per party on loopback with mutual TLS (or --in-process);
    write OUT/result.json and each party's weights."""
    from ..api import train_prepared
    from ..run.report import RunError
    from ..run.setup import label_notes, prepare

    if not in_process and ray is None:
        from ..launch.processes import warm_up

        warm_up()  # the party processes' forker imports torch while the plan is read and checked
    try:  # party processes make their own optimizers: those here are only checked
        p, setups, shapes = prepare(plan, epochs=epochs, seed=seed, probe=not in_process)
    except PlanError as e:
        _fail(str(e))
    for note in label_notes(setups):
        err.print(f"[bold]note:[/] {escape(note)}", highlight=False)
    out = out or Path("runs") / plan.stem
    if resume and force:
        _fail("--resume goes on with the run in --out, --force replaces it: give one of them")
    if ray is not None and (in_process or link is not None):
        _fail("--ray places party processes on a Ray cluster: it cannot go with --in-process or --link")
    if log is not None and ray is not None:
        _fail("--log is not available with --ray yet: the parties' metrics are in OUT/result.json")
    if log_format not in ("text", "json"):
        _fail(f"--log-format {log_format!r}: choose text or json")
    if (status or log_format != "text") and (in_process or ray is not None):
        _fail("--status and --log-format apply to party processes on this machine: not with --in-process or --ray")
    if link is not None:
        from ..wire.transport.slowlink import parse_link

        if in_process:
            _fail("--link emulates a slow network between party processes: it cannot go with --in-process")
        try:
            parse_link(link)
        except ValueError as e:
            _fail(f"--link: {e}")
    if not resume:  # every option checked first: an earlier run is removed only for a run that can start
        _fresh(out, force)
    elif not (out / "parties").is_dir():
        _fail(f"--resume: {out} holds no run to go on with (no parties/ folder)")
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
            result = train_prepared(p, setups, shapes, launcher="threads" if in_process else
                                    ("ray" if ray is not None else "processes"), source=plan, epochs=epochs,
                                    seed=seed, out=out, on_step=on_step, log=log, resume=resume, insecure=insecure,
                                    link=link, ray_address=ray, **_watching(status, log_format))
        except PlanError as e:
            _fail(str(e))
        except RunError as e:
            for party, text in e.errors.items():
                err.print(f"[bold red]party {party} failed:[/] {text}", highlight=False)
            raise typer.Exit(1) from None
    _summary(result)
    console.print(f"wrote {out / 'result.json'}")


def _watching(status: bool, log_format: str) -> dict:
    """``train_prepared``'s options for ``run --status`` and ``--log-format`` (none when not asked)."""
    more: dict = {} if log_format == "text" else {"log_format": log_format}
    if status:
        more["on_status"] = lambda name, url: console.print(f"status of {name}: {url}", highlight=False)
    return more


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
                                                       "gives up [default: the plan's [train] step_timeout, "
                                                       "else 120, whatever the schedule]"),
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
                                                      "at once]"),
          predict: Optional[Path] = typer.Option(None, "--predict", help="instead of training, predict with this "
                                                 "party's part of a finished run (its RUN_DIR; --data: its new rows): "
                                                 "predictions.csv is written where a head is"),
          status: Optional[str] = typer.Option(None, "--status", metavar="HOST:PORT", help="serve this party's live "
                                               "status over HTTP: a page at /, /status.json, /metrics (Prometheus); "
                                               "bind 127.0.0.1 unless others must reach it; port 0: any free port"),
          log_format: str = typer.Option("text", "--log-format", help="text, or json: log records as JSON lines "
                                         "(time, level, logger, party, message) on stderr")) -> None:
    """Run one party of PLAN on this machine, talking to its neighbours over gRPC (with --predict: its part of a
    prediction from a finished run, each site with its own rows)."""
    from ..launch.party import PartyOptions, party_process

    code = party_process(PartyOptions(
        str(plan), name, certs=None if certs is None else str(certs), insecure=insecure, listen=listen,
        peers=_peers(peer), dial_out=tuple(dial_out), out=None if out is None else str(out), epochs=epochs, seed=seed,
        connect_timeout_s=connect_timeout, step_timeout_s=step_timeout, max_message_mb=max_message_mb,
        progress=progress, quiet=quiet, log=log, data=None if data is None else str(data), resume=resume,
        rejoin_wait_s=rejoin_wait, predict=None if predict is None else str(predict), status=status,
        log_format=log_format))
    if code:
        raise typer.Exit(code)


@app.command()
def certs(plan: Path = typer.Argument(..., help="plan file (.toml)"),
          out: Path = typer.Option(..., help="folder for ca.pem and NAME.pem/NAME.key per party"),
          days: int = typer.Option(365, min=1, help="validity")) -> None:
    """Make a certificate authority and a key and certificate for every party of PLAN."""
    from ..wire.transport.tls import make_certs

    try:
        p = load_plan(plan)
    except PlanError as e:
        _fail(str(e))
    from ..clients.layout import Topology

    names = Topology.of(p).names  # with [clients]: every client and role
    make_certs(names, out, days=days)
    shown = ", ".join(names[:8]) + (f" ... ({len(names)} in all)" if len(names) > 8 else "")
    console.print(f"wrote a CA and certificates for {shown} to {out}")
    console.print("give each party only ca.pem and its own NAME.pem and NAME.key; keep ca.key offline")


@app.command()
def predict(run_dir: Path = typer.Argument(..., help="the --out folder of a finished run"),
            data: list[str] = typer.Option([], help="new rows: NAME=FILE for each party that holds data "
                                           "(repeatable; its columns as at training), or one FILE for a plan whose "
                                           "data one party holds; default: the run's test split"),
            id_column: Optional[str] = typer.Option(None, help="id column of the files (default: as at training)")) -> None:
    """Run a trained plan forward; predictions (the class and each class's probability) go to the
    party owning each head."""
    from ..api import predict as do_predict
    from ..data import DataError
    from ..run.report import RunError

    try:
        out = do_predict(run_dir, _party_files(data) if data else None, id_column=id_column)
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


@app.command()
def generate(run_dir: Path = typer.Argument(..., help="the --out folder of a run that trained a language model"),
             prompt: str = typer.Option(..., help="the text to continue (tokenised as the run's data was)"),
             max_new_tokens: int = typer.Option(20, min=1, help="tokens to decode"),
             tokenizer: Optional[Path] = typer.Option(None, help="tokenizer.json or model folder (default: the "
                                                      "run's data's)"),
             launcher: str = typer.Option("threads", help="threads (every party in this process) or processes (one "
                                                          "process per party, over gRPC with mutual TLS)")) -> None:
    """Decode greedily across the parties, each with its trained piece and a key/value cache: the prompt stays
    with its owner, each new token's hidden state crosses each cut once; tokens per second and bytes per token
    over each wire."""
    from ..api.generation import generate as do_generate
    from ..run.report import RunError

    try:
        out = do_generate(run_dir, prompt, max_new_tokens=max_new_tokens, tokenizer=tokenizer, launcher=launcher)
    except (PlanError, RunError) as e:
        _fail(str(e))
    console.print(out["text"], highlight=False, markup=False)
    crossed = ", ".join(f"{w}: {b:.0f} B" for w, b in out["bytes_per_token"].items())
    err.print(f"{len(out['tokens'])} tokens, {out['tokens_per_second']:.1f} tokens/s; bytes per token over each wire: "
              f"{escape(crossed)}", highlight=False)


def _party_files(given: list[str]) -> dict[str, str] | str:
    """``--data NAME=FILE`` (repeatable) as {NAME: FILE}; one bare FILE as it is."""
    if len(given) == 1 and "=" not in given[0]:
        return given[0]
    out: dict[str, str] = {}
    for item in given:
        name, sep, file = item.partition("=")
        if not sep or not name:
            _fail(f"--data {item!r}: several files are given; say whose each is (--data NAME=FILE)")
        if name in out:
            _fail(f"--data names party {name!r} twice")
        out[name] = file
    return out


@app.command("link")
def link_cmd(to: str = typer.Option(..., "--to", help="HOST:PORT to relay to (a party that listens)"),
             listen: str = typer.Option("127.0.0.1:0", help="HOST:PORT to listen on (port 0: any free port)"),
             rtt: str = typer.Option("50ms", help="round trip, e.g. 20ms"),
             bandwidth: Optional[str] = typer.Option(None, help="each way, e.g. 100mbit (default: unlimited)")) -> None:
    """Relay TCP connections to --to through an emulated slow link (delay and bandwidth each way),
    to try a deployment's link before there is one: point a party's --peer at the address shown."""
    from ..wire.transport.slowlink import SlowLink, parse_link

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
