"""``splitlearn status HOST:PORT``: a party process's live status (its ``--status`` endpoint) as a table."""

from __future__ import annotations

import json
import time
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from ..core.units import human
from . import _fail, app, console

_FIELDS = {"party": str, "run": str, "role": str, "state": str, "pid": int, "step": int, "total": int, "epoch": int,
           "epochs": int, "unit": str, "mode": str, "bytes_sent": int, "bytes_received": int, "peers": dict,
           "updated_at": (int, float), "now": (int, float)}


def _target(address: str) -> str:
    """``HOST:PORT``, or the URL a launcher printed, as the status.json address; exits 2 naming a bad one."""
    from ..launch.status import parse_address

    given = address.strip()
    if given.startswith(("http://", "https://")):
        given = given.split("://", 1)[1].split("/", 1)[0]
    try:
        host, port = parse_address(given, "address")
    except ValueError as e:
        _fail(str(e))
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/status.json"


def _read(url: str, address: str, timeout: float) -> dict[str, Any]:
    """The status at ``url``, checked; one error line (exit 2) for no answer or an answer that is no party's."""
    import urllib.error
    import urllib.request

    hint = "is the party running with --status at that address? ('splitlearn run --status' prints each party's)"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - http:// of the address given
            body = r.read(1 << 20)
    except urllib.error.HTTPError as e:
        _fail(f"{address} answered HTTP {e.code} for /status.json: not a splitlearn party's status endpoint")
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        _fail(f"no party status at {address}: {getattr(reason, 'strerror', None) or reason}; {hint}")
    try:
        status = json.loads(body)
    except ValueError:
        status = None
    wrong = [k for k, kind in _FIELDS.items() if not isinstance(status, dict) or not isinstance(status.get(k), kind)]
    if wrong:
        _fail(f"{address} answered, but not with a party's status (missing or mistyped: {', '.join(wrong[:5])})")
    return status


@app.command()
def status(address: str = typer.Argument(..., help="HOST:PORT of a party's --status endpoint (or its URL)"),
           timeout: float = typer.Option(5.0, min=0.1, help="seconds to wait for the answer"),
           as_json: bool = typer.Option(False, "--json", help="print the status as JSON")) -> None:
    """Show what a running party process is doing: state, step of total, epoch, loss, bytes, peers, last error."""
    s = _read(_target(address), address, timeout)
    if as_json:
        console.print_json(json.dumps(s))
        return
    table = Table(title=f"party {escape(s['party'])} of run {escape(s['run'] or '?')}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    pct = f" ({100 * s['step'] // s['total']}%)" if s["total"] else ""
    loss = s.get("loss")
    peers = ", ".join(f"{p} ({'connected' if up else 'not connected'})" for p, up in s["peers"].items()) or "-"
    for key, value in (("state", s["state"] + (f" ({s['mode']})" if s["mode"] else "")), ("role", s["role"] or "-"),
                       ("process", str(s["pid"])), (s["unit"], f"{s['step']} of {s['total']}{pct}"),
                       ("epoch", f"{s['epoch']} of {s['epochs']}" if s["epochs"] else "-"),
                       ("last training loss", f"{loss:.5g}" if isinstance(loss, (int, float)) else "-"),
                       ("bytes sent", human(s["bytes_sent"], "B")), ("bytes received", human(s["bytes_received"], "B")),
                       ("peers", peers), ("last error", str(s.get("last_error") or "none")),
                       ("updated", f"{max(0.0, s['now'] - s['updated_at']):.1f} s ago, "
                                   f"{time.strftime('%H:%M:%S', time.localtime(s['updated_at']))}")):
        table.add_row(key, escape(value))
    console.print(table)
