"""The commands of a deployment across sites, where keys stay home: authority, keys, sign, revoke,
provision (:mod:`splitlearn.wire.transport.authority`)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer

from ..core.specs import PlanError
from . import _fail, app, console


@app.command()
def authority(out: Path = typer.Option(..., help="folder for the consortium's authority: ca.key (keep it offline), "
                                       "ca.pem, ledger.json, crl.pem"),
              days: int = typer.Option(3650, min=1, help="validity of the authority's certificate")) -> None:
    """Make the consortium's certificate authority: its key (mode 0600) and certificate, a ledger of
    what it signs, and an empty revocation list."""
    from ..wire.transport.authority import make_authority
    from ..wire.transport.tls import CertificateError

    try:
        ca = make_authority(out, days=days)
    except (CertificateError, OSError) as e:
        _fail(str(e))
    console.print(f"wrote the authority to {out}: send {ca} to every party; keep {out / 'ca.key'} offline",
                  soft_wrap=True, highlight=False)


@app.command()
def keys(name: str = typer.Option(..., "--name", help="this party's name in the plan"),
         out: Path = typer.Option(..., help="folder for NAME.key (it never leaves this machine) and NAME.csr "
                                  "(e.g. the kit folder from 'splitlearn provision')"),
         role: str = typer.Option("party", help="party or admin")) -> None:
    """On a party's own machine: a new private key and a certificate signing request (NAME.csr) to send to
    the authority."""
    from ..wire.transport.authority import make_request
    from ..wire.transport.tls import CertificateError

    try:
        csr = make_request(name, out, role=role)
    except (CertificateError, OSError) as e:
        _fail(str(e))
    console.print(f"wrote {out / (name + '.key')} (mode 0600: it never leaves this machine) and {csr}: send {csr} "
                  f"to the authority, and put the {name}.pem it returns next to the key", soft_wrap=True,
                  highlight=False)


@app.command()
def sign(requests: list[Path] = typer.Argument(..., help="NAME.csr files from 'splitlearn keys'"),
         ca: Path = typer.Option(..., "--ca", help="the authority's folder ('splitlearn authority')"),
         days: int = typer.Option(365, min=1, help="validity of each certificate"),
         out: Optional[Path] = typer.Option(None, help="folder for the certificates [default: next to each request]")) \
        -> None:
    """The authority signs requests: a certificate NAME.pem for each, with the party's name and role and an
    expiry, its serial recorded in the authority's ledger."""
    from ..wire.transport.authority import sign_requests
    from ..wire.transport.tls import CertificateError, utc

    try:
        issued = sign_requests(requests, ca, days=days, out=out)
    except (CertificateError, OSError) as e:
        _fail(str(e))
    for i in issued:
        console.print(f"signed {i.name} ({i.role}), serial {i.serial:#x}, valid until {utc(i.not_after)}: {i.path}",
                      soft_wrap=True, highlight=False)


@app.command()
def revoke(name: str = typer.Argument(..., help="the party whose certificates to revoke"),
           ca: Path = typer.Option(..., "--ca", help="the authority's folder")) -> None:
    """Put every certificate of NAME on the authority's revocation list (crl.pem); send that file to every
    party's certificate folder: they refuse NAME from their next connection on."""
    from ..wire.transport.authority import revoke as do_revoke
    from ..wire.transport.tls import CertificateError

    try:
        serials = do_revoke(name, ca)
    except (CertificateError, OSError) as e:
        _fail(str(e))
    what = (f"revoked {len(serials)} certificate(s) of {name!r} (serials {', '.join(f'{s:#x}' for s in serials)})"
            if serials else f"every certificate of {name!r} was revoked already")
    console.print(f"{what}; copy {ca / 'crl.pem'} into every party's certificate folder (read at each new "
                  "connection)", soft_wrap=True, highlight=False)


def start_script(plan, plan_file: str, name: str) -> str:
    """``start.sh`` of party ``name``: ``splitlearn party`` with the plan's addresses of itself (where it
    listens) and of the parties it dials; PlanError where one is missing."""
    from ..clients.layout import Topology

    topo = Topology.of(plan)
    listens = [name] if topo.accepts(name) else []
    address = {who: plan.parties[who].address if who in plan.parties else None for who in listens + topo.dials(name)}
    for who, addr in address.items():
        if not addr:
            raise PlanError(f"party {who!r} listens (for {topo.accepts(who)}) but the plan gives it no address, so no "
                            "start script can say where", entry=f"parties.{who}.address",
                            hint='set it, e.g. address = "server.example.org:50051"')
    args = ["splitlearn", "party", plan_file, "--name", name, "--certs", "."]
    args += [a for who in listens for a in ("--listen", address[who])]
    args += [a for peer in topo.dials(name) for a in ("--peer", f"{peer}={address[peer]}")]
    command = " ".join(shlex.quote(a) for a in [*args, "--out", "run"])
    return (f"#!/bin/sh\n# party {name!r} of plan {plan.name!r} (splitlearn provision): needs ca.pem, crl.pem, "
            f"{name}.pem and {name}.key here (README.txt)\ncd \"$(dirname \"$0\")\" || exit 1\nexec {command} \"$@\"\n")


def _readme(plan, plan_file: str, name: str, signed: bool) -> str:
    cert = (f"{name}.pem, your certificate, signed for the key you made with `splitlearn keys`: put that key "
            f"({name}.key) here too" if signed else
            f"your certificate is not here yet: in this folder, run `splitlearn keys --name {name} --out .`, send "
            f"{name}.csr to the authority and put the {name}.pem it returns here")
    return (f"Kit of party {name!r} for plan {plan.name!r}, from the consortium's authority (splitlearn provision).\n"
            f"- {plan_file}: the plan, the same at every party; files it names by relative path (data, model code) "
            "are read from this folder (or pass --data FILE to start.sh)\n"
            "- ca.pem: the authority; crl.pem: the certificates it revoked (replace it when the authority sends a new "
            "one: it is read at each new connection)\n"
            f"- {cert}\n"
            f"- start.sh: starts this party (its options are the plan's addresses; more options go through)\n"
            f"Your private key {name}.key never leaves your machine; nobody else needs it.\n")


@app.command()
def provision(plan: Path = typer.Argument(..., help="plan file (.toml)"),
              ca: Path = typer.Option(..., "--ca", help="the authority's folder"),
              out: Path = typer.Option(..., help="folder for the kits, one folder per party"),
              certs: Optional[Path] = typer.Option(None, help="folder of signed NAME.pem certificates "
                                                   "('splitlearn sign --out')")) -> None:
    """Write a kit per party of PLAN to send it: the plan, the authority's certificate, the current revocation
    list, the party's signed certificate when there is one, and start.sh from the plan's addresses. No key."""
    from ..core.load import load_plan
    from ..clients.layout import Topology
    from ..wire.transport.authority import write_kit
    from ..wire.transport.tls import CertificateError

    if certs is not None and not certs.is_dir():
        _fail(f"--certs {certs} is not a folder: give the folder of signed NAME.pem ('splitlearn sign --out DIR')")
    try:
        p = load_plan(plan)
        names = Topology.of(p).names
        scripts = {n: start_script(p, plan.name, n) for n in names}  # every address checked before any kit
        missing = [n for n in names if not write_kit(out / n, n, plan, ca, certs, scripts[n],
                                                     lambda signed, n=n: _readme(p, plan.name, n, signed))]
    except PlanError as e:
        _fail(str(e.in_file(plan)))
    except (CertificateError, OSError) as e:
        _fail(str(e))
    console.print(f"wrote kits for {len(names)} parties to {out}" + (
        f"; without a certificate yet (see their README.txt): {', '.join(missing)}" if missing else ""),
                  soft_wrap=True, highlight=False)
