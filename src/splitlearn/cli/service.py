"""A party kept up between runs and the administrator's commands: ``serve``, ``submit``, ``runs``, ``stop``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from . import _fail, app, console

__all__ = ["serve", "submit", "runs", "stop"]


@app.command()
def serve(kit: Path = typer.Option(..., help="the party's kit (splitlearn provision; its key made there with "
                                   "splitlearn keys): ca.pem, NAME.pem, NAME.key, crl.pem"),
          name: str = typer.Option(..., "--name", help="which party this service is"),
          admin: str = typer.Option("127.0.0.1:7400", help="HOST:PORT where administrators submit runs (HTTPS, "
                                    "an admin certificate of the kit's authority)"),
          data: Optional[Path] = typer.Option(None, help="this site's rows for every run (as splitlearn party --data)"),
          listen: Optional[str] = typer.Option(None, help="HOST:PORT the party listens on (default: the plan's)"),
          peer: list[str] = typer.Option([], help="NAME=HOST:PORT of a party to dial (repeatable)"),
          status: Optional[str] = typer.Option(None, help="HOST:PORT where each run's party serves its live status "
                                               "(splitlearn status HOST:PORT)"),
          connect_timeout: float = typer.Option(60.0, min=1.0, help="seconds each run's party waits for its "
                                                "neighbours"),
          allow_code: bool = typer.Option(False, "--allow-code", help="run plans that name code of their own "
                                          "(a factory); refused by default")) -> None:
    """Keep party NAME up: take runs submitted by an administrator, one at a time, each in KIT/runs/RUN/."""
    from ..launch.service import Service

    peers = {}
    for item in peer:
        who, sep, where = item.partition("=")
        if not sep:
            _fail(f"--peer {item!r}: give NAME=HOST:PORT")
        peers[who] = where
    try:
        service = Service(kit, name, admin, data=None if data is None else str(data.resolve()), listen=listen,
                          peers=peers, status=status, connect_timeout_s=connect_timeout, allow_code=allow_code,
                          on_change=lambda e: console.print(f"run {e.run!r}: {e.state}"
                                                            + (f" ({e.error})" if e.error else ""), highlight=False,
                                                            soft_wrap=True))
    except (OSError, ValueError) as e:
        _fail(f"cannot start the service of {name!r}: {e}")
    console.print(f"party {name!r} takes runs at https://{service.address} (admin certificates only); runs in "
                  f"{service.kit / 'runs'}", highlight=False)
    import signal
    import threading

    # SIGTERM (systemctl stop) ends the run's party process too, as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=service.close, daemon=True).start())
    try:
        service.serve_forever()
    except KeyboardInterrupt:
        pass


def _call(fn, *args):
    from ..launch.service import ServiceError

    try:
        return fn(*args)
    except (ServiceError, OSError) as e:
        _fail(str(e))


@app.command()
def submit(plan: Path = typer.Argument(..., help="plan file (.toml)"),
           to: list[str] = typer.Option(..., help="HOST:PORT of a party's service (repeatable: every party named "
                                        "in the plan that runs a service)"),
           certs: Path = typer.Option(..., help="folder with ca.pem and the administrator's ADMIN.pem/.key"),
           as_: str = typer.Option(..., "--as", help="the administrator's name (its certificate's)"),
           run: Optional[str] = typer.Option(None, help="the run's name (default: the plan's name and the time)")) -> None:
    """Submit PLAN as a run to parties' services; each starts its part when its queue reaches it."""
    from ..core.load import load_plan
    from ..core.specs import PlanError
    from ..launch.service import submit as do_submit

    try:
        import datetime as dt

        run = run or f"{load_plan(plan).name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    except PlanError as e:
        _fail(str(e))
    for where in to:
        entry = _call(do_submit, plan, where, certs, as_, run)
        console.print(f"{where}: run {entry['run']!r} {entry['state']}", highlight=False)


@app.command()
def runs(at: str = typer.Option(..., help="HOST:PORT of a party's service"),
         certs: Path = typer.Option(..., help="folder with ca.pem and the administrator's ADMIN.pem/.key"),
         as_: str = typer.Option(..., "--as", help="the administrator's name"),
         as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """The runs a party's service holds: queued, running, done, failed or stopped."""
    from ..launch.service import list_runs

    answer = _call(list_runs, at, certs, as_)
    if as_json:
        console.print_json(json.dumps(answer))
        return
    table = Table(title=f"runs of {answer['party']} at {at}")
    for col in ("run", "state", "submitted", "started", "ended", "error"):
        table.add_column(col)
    for r in answer["runs"]:
        table.add_row(*(str(r.get(c) or "") for c in ("run", "state", "submitted", "started", "ended", "error")))
    console.print(table)


@app.command("stop")
def stop(run: str = typer.Argument(..., help="the run's name"),
         at: list[str] = typer.Option(..., help="HOST:PORT of a party's service (repeatable)"),
         certs: Path = typer.Option(..., help="folder with ca.pem and the administrator's ADMIN.pem/.key"),
         as_: str = typer.Option(..., "--as", help="the administrator's name")) -> None:
    """Stop a run at parties' services: dropped from the queue, or its party process ended."""
    from ..launch.service import stop_run

    for where in at:
        entry = _call(stop_run, run, where, certs, as_)
        console.print(f"{where}: run {entry['run']!r} {entry['state']} ({entry.get('error') or ''})", highlight=False)
