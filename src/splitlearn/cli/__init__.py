"""The ``splitlearn`` command line. It parses arguments, calls :mod:`splitlearn.api`, the launchers
and the tools, and prints; the commands live in :mod:`.training` (run, party, certs, predict, generate, link)
and :mod:`.analysis` (inspect, audit, report, cost, compare)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..core.specs import PlanError

# rich_markup_mode=None: help texts are plain (square brackets, as in pip install 'splitlearn[ray]', survive)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Split learning: train, inspect and predict from plans of any configuration.")
console = Console()
err = Console(stderr=True, soft_wrap=True)  # errors keep their paths whole (never folded at 80 columns)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        from .. import __version__

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


def _fresh(out: Path, force: bool) -> None:
    """Nothing is overwritten silently (:func:`~splitlearn.launch.results.clear_run_folder`)."""
    from ..launch.results import clear_run_folder

    try:
        clear_run_folder(out, force)
    except PlanError as e:
        _fail(str(e))


def _bar(quiet: bool) -> Progress:
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    return Progress(*columns, console=console, disable=quiet)


def main() -> None:  # pragma: no cover
    """The ``splitlearn`` command. Its process ends with ``os._exit`` once the command is done and its
    output flushed: interpreter finalization can deadlock on gRPC's call objects (a ``__del__`` waiting
    for a lock that a frozen daemon thread holds), and a party process must never outlive its run."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC's C core logs (E1202 ... add_port.cc) only with --debug
    from ..launch.party import exit_flushed
    from ..run.allocator import tune_allocator

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
        exit_flushed(code)


from . import training, analysis  # noqa: E402,F401,I001 - their commands register on app, in this order (--help)
from . import deploy  # noqa: E402,F401 - authority, keys, sign, revoke, provision: keys that stay home
from . import status  # noqa: E402,F401 - a running party's live status
from . import export  # noqa: E402,F401 - a trained party's segments as ONNX files, for serving
from . import service  # noqa: E402,F401 - serve, submit, runs, stop: a party kept up between runs

if __name__ == "__main__":  # pragma: no cover
    main()
