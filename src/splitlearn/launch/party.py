"""One party process's whole life, as a function: what ``splitlearn party`` runs, and what the
launchers start in every party process they fork (:mod:`.forker`) or spawn
(``python -m splitlearn.launch.party OPTIONS-JSON``), without going through the command line.

:class:`PartyOptions` holds every setting of a party process (the ``splitlearn party`` options);
:func:`party_process` runs it and returns the process's exit status: 0 once its report is
written, 1 when it failed (``error.json`` in its ``--out`` folder names why), 2 for options that
cannot run, 128 + the signal when it was stopped (Ctrl-C: 130; SIGTERM, a service's stop or
``systemctl stop``: 143), having told its neighbours.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .stopping import Stopped, stop_on_sigterm

__all__ = ["PartyOptions", "party_process", "main", "exit_flushed"]


@dataclass(frozen=True)
class PartyOptions:
    """What a party process runs: the ``splitlearn party`` options, typed (see its ``--help``)."""

    plan: str
    name: str
    certs: str | None = None  # folder of the CA and this party's key; None with insecure
    insecure: bool = False
    listen: str | None = None  # HOST:PORT
    peers: dict[str, str] = field(default_factory=dict)  # party -> HOST:PORT it dials
    dial_out: tuple[str, ...] = ()
    out: str | None = None
    epochs: int | None = None
    seed: int | None = None
    connect_timeout_s: float = 60.0
    step_timeout_s: float | None = None
    max_message_mb: float = 256.0
    progress: bool = False  # progress lines on stdout, for the launcher
    quiet: bool = False
    log: str | None = None  # tensorboard[:DIR] or mlflow[:URI]
    data: str | None = None
    resume: bool = False
    rejoin_wait_s: float | None = None
    generate: dict | None = None  # a generation job instead of training (splitlearn.launch.generating.job_of)
    predict: str | None = None  # a run folder to predict with instead of training (this site's part)
    run: str = ""  # the run this process belongs to: its peers' processes of another run are turned away
    status: str | None = None  # HOST:PORT of this process's live status endpoint (splitlearn.launch.status)
    log_format: str = "text"  # or "json": log records as JSON lines on stderr

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "PartyOptions":
        """Options a launcher wrote (:meth:`to_json`); a ValueError naming what does not fit."""
        body = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(body, dict) or set(body) - names:
            raise ValueError(f"party options with unknown keys {sorted(set(body) - names) if isinstance(body, dict) else body!r}")
        body["dial_out"] = tuple(body.get("dial_out") or ())
        return cls(**body)


def party_process(opts: PartyOptions) -> int:
    """Run the party of ``opts`` in this process, over gRPC; the process's exit status. A failure
    is one line on stderr (and ``error.json`` in the party's ``out`` folder for its launcher). The C library's
    allocator is tuned first (:func:`~splitlearn.run.allocator.tune_allocator`), however the process started:
    forked by the launcher, spawned, or ``splitlearn party``."""
    from ..core.specs import PlanError
    from ..run.allocator import tune_allocator
    from ..run.report import RunError
    from ..core.units import human
    from ..wire.messages import Limits
    from .oneparty import progress_line, run_one_party
    from .results import write_json
    from .status import PartyWatch

    tune_allocator()
    if opts.certs is None and not opts.insecure:
        print("error: give --certs DIR (made by 'splitlearn certs PLAN --out DIR'), or --insecure to run without TLS",
              file=sys.stderr)
        return 2
    try:  # its title, log format and status endpoint
        watch = PartyWatch(opts.name, status=opts.status, log_format=opts.log_format, out=opts.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if opts.insecure:
        watch.say(logging.WARNING, "--insecure: this party talks without TLS; peers are not authenticated")
    limit = int(opts.max_message_mb * 2**20)
    try:
        with stop_on_sigterm():
            report = run_one_party(opts.plan, opts.name, certs=None if opts.insecure else Path(opts.certs),
                                   listen=opts.listen, peers=dict(opts.peers), out=None if opts.out is None else Path(opts.out),
                                   epochs=opts.epochs, seed=opts.seed, connect_timeout=opts.connect_timeout_s,
                                   step_timeout=opts.step_timeout_s, dial_out=list(opts.dial_out),
                                   on_step=(lambda pr: print(progress_line(pr), flush=True)) if opts.progress else None,
                                   limits=Limits(message_bytes=limit, tensor_bytes=limit), log=opts.log,
                                   data=opts.data, resume=opts.resume, rejoin_wait=opts.rejoin_wait_s,
                                   generate=opts.generate, predict=opts.predict, run=opts.run, status=watch.status)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Stopped): said in one line, as a failure is
        text = f"stopped by {str(e) or 'Ctrl-C'}"
        if opts.out is not None:
            write_json(Path(opts.out) / "parties" / opts.name / "error.json", {"party": opts.name, "error": text})
        watch.say(logging.WARNING, f"party {opts.name}: {text}")
        watch.end(text)
        return 128 + (signal.SIGTERM if isinstance(e, Stopped) else signal.SIGINT)
    except Exception as e:  # noqa: BLE001 - every failure of a party is reported the same way
        text = str(e) if isinstance(e, (PlanError, RunError, RuntimeError, OSError, ValueError)) else repr(e)
        if opts.out is not None:
            write_json(Path(opts.out) / "parties" / opts.name / "error.json", {"party": opts.name, "error": text})
        watch.say(logging.ERROR, f"party {opts.name}: {text}")
        watch.end(text)
        return 1
    if not opts.quiet:
        m = report.meter
        print(f"party {opts.name} done: sent {human(m['bytes_sent'], 'B')}, received {human(m['bytes_received'], 'B')}, "
              f"{human(m['flops'])} FLOPs")
    if "predicted" in report.meter:  # (said even when quiet: it is the result)
        print(f"party {opts.name}: {report.meter['predicted']['rows']} predictions written to "
              f"{report.meter['predicted']['file']}")
    watch.end()  # (a status endpoint serves "done" until read, briefly)
    return 0


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - the process entry of a spawned party
    """``python -m splitlearn.launch.party OPTIONS-JSON``: one party process; it ends with ``os._exit``
    once its output is flushed (finalization can deadlock on gRPC's call objects)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    code = 2
    try:
        args = sys.argv[1:] if argv is None else argv
        if len(args) != 1:
            print("usage: python -m splitlearn.launch.party OPTIONS-JSON", file=sys.stderr)
        else:
            code = party_process(PartyOptions.from_json(args[0]))
    except (ValueError, TypeError) as e:  # options that are not a launcher's
        print(f"error: {e}", file=sys.stderr)
    finally:
        exit_flushed(code)


def exit_flushed(code: int) -> None:  # pragma: no cover - ends the process
    """End the process with ``code`` once logging and the standard streams are flushed."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a broken pipe: nothing more to say
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
