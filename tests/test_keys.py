"""Keys stay home (issue #27 items 1 and 6): an authority signs the requests each party makes on its own
machine, revokes, and provisions kits; every party refuses a revoked or expired certificate at the
handshake, naming the party and why; `splitlearn run` keeps its throw-away keys in its run folder."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

import splitlearn
from splitlearn.cli import app
from splitlearn.wire.transport import TransportTimeout
from splitlearn.wire.transport.authority import make_authority, make_request, revoke, sign_requests
from splitlearn.wire.transport.grpc import GrpcTransport
from splitlearn.wire.transport.tls import CertificateError, Credentials, load_credentials, private_folder

from .support import free_port, kill_tree, split_mlp, toml

pytestmark = pytest.mark.timeout(120)

runner = CliRunner()


def plan_file(folder: Path, server_port: int) -> Path:
    """Digits, an MLP cut after its first layer: the hospital (data, labels) dials the server at its address."""
    body = split_mlp("keys", [64, 16, 10], lr=0.1, data={"dataset": "digits"},
                     train={"epochs": 1, "batch_size": 64, "seed": 3},
                     parties={"server": {"address": f"127.0.0.1:{server_port}"}})
    path = folder / "keys.toml"
    path.write_text(toml(body))
    return path


def cli(*args: str) -> str:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_made_at_home_sign_and_train_from_kits(tmp_path):
    port = free_port()
    plan = plan_file(tmp_path, port)
    ca, kits = tmp_path / "ca", tmp_path / "kits"
    cli("authority", "--out", ca)
    assert mode(ca / "ca.key") == 0o600 and mode(ca) == 0o700
    out = cli("provision", plan, "--ca", ca, "--out", kits)
    assert "without a certificate yet" in out
    assert sorted(p.name for p in kits.iterdir()) == ["hospital", "server"]
    assert not list(kits.rglob("*.key"))  # a kit never holds a key
    for name in ("hospital", "server"):  # at each site, in its kit: the key is made there and stays there
        assert f"splitlearn keys --name {name} --out ." in (kits / name / "README.txt").read_text()
        cli("keys", "--name", name, "--out", kits / name)
        assert mode(kits / name / f"{name}.key") == 0o600
    cli("sign", kits / "hospital" / "hospital.csr", kits / "server" / "server.csr", "--ca", ca)
    ledger = json.loads((ca / "ledger.json").read_text())["certificates"]
    assert sorted(e["name"] for e in ledger) == ["hospital", "server"] and all(e["revoked"] is None for e in ledger)
    commands = {}
    for name in ("hospital", "server"):
        assert sorted(p.name for p in (kits / name).iterdir()) == sorted(
            ["README.txt", "ca.pem", "crl.pem", "keys.toml", "start.sh", f"{name}.csr", f"{name}.key", f"{name}.pem"])
        script = (kits / name / "start.sh").read_text()
        assert mode(kits / name / "start.sh") & 0o100
        commands[name] = shlex.split(next(line for line in script.splitlines() if line.startswith("exec ")))
    assert commands["server"] == ["exec", "splitlearn", "party", "keys.toml", "--name", "server", "--certs", ".",
                                  "--listen", f"127.0.0.1:{port}", "--out", "run", "$@"]
    assert commands["hospital"] == ["exec", "splitlearn", "party", "keys.toml", "--name", "hospital", "--certs", ".",
                                    "--peer", f"server=127.0.0.1:{port}", "--out", "run", "$@"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    procs = {n: subprocess.Popen(["sh", str(kits / n / "start.sh"), "-q"], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, cwd=tmp_path) for n in ("server", "hospital")}
    outs = {n: p.communicate(timeout=100)[0].decode() for n, p in procs.items()}
    assert {n: p.returncode for n, p in procs.items()} == {"server": 0, "hospital": 0}, outs
    report = json.loads((kits / "server" / "run" / "parties" / "server" / "report.json").read_text())
    local = splitlearn.train(plan, out=tmp_path / "local")  # the kits train what the plan trains in one process
    assert report["metrics"]["digit"]["test_accuracy"][-1] == local["metrics"]["test_accuracy"]


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """An authority and three sites, each with its key made at home and its signed certificate."""
    root = tmp_path_factory.mktemp("sites")
    make_authority(root / "ca")
    for name in ("hospital", "clinic_a", "server"):
        make_request(name, root / name)
        shutil.copyfile(root / "ca" / "ca.pem", root / name / "ca.pem")
    sign_requests([root / n / f"{n}.csr" for n in ("hospital", "clinic_a", "server")], root / "ca")
    return root


def dial(name: str, folder: Path, target: str, port: int) -> GrpcTransport:
    return GrpcTransport(name, dial={target: f"127.0.0.1:{port}"}, credentials=load_credentials(folder, name),
                         connect_timeout=10).start()


def test_revoked_party_is_refused_at_the_handshake_with_its_name(sites, caplog):
    hospital = GrpcTransport("hospital", listen="127.0.0.1:0", accept=["clinic_a", "server"],
                             credentials=load_credentials(sites / "hospital", "hospital"), connect_timeout=10).start()
    try:
        clinic = dial("clinic_a", sites / "clinic_a", "hospital", hospital.port)
        clinic.wait_connected(10)  # before the revocation: welcome
        clinic.close()
        assert revoke("clinic_a", sites / "ca") and revoke("clinic_a", sites / "ca") == []
        day = time.strftime("%Y-%m-%d", time.gmtime())
        shutil.copyfile(sites / "ca" / "crl.pem", sites / "hospital" / "crl.pem")  # the running listener reads it
        clinic = dial("clinic_a", sites / "clinic_a", "hospital", hospital.port)
        start = time.monotonic()
        with caplog.at_level(logging.WARNING), pytest.raises(TransportTimeout) as refused:
            clinic.wait_connected(10)
        assert time.monotonic() - start < 5  # refused for good at once, not dialed again until the timeout
        clinic.close()
        assert "UNAUTHENTICATED: hospital refused 'clinic_a': certificate of 'clinic_a' was revoked on " + day \
            in str(refused.value)
        assert any("hospital: refused a connection from 'clinic_a'" in r.getMessage() and "was revoked on" in
                   r.getMessage() for r in caplog.records)
        server = dial("server", sites / "server", "hospital", hospital.port)  # the others still get in
        server.wait_connected(10)
        server.close()
    finally:
        hospital.close()
    # the other way round: the revoked clinic listens, and the server, whose folder holds the list, dials it
    clinic = GrpcTransport("clinic_a", listen="127.0.0.1:0", accept=["server"],
                           credentials=load_credentials(sites / "clinic_a", "clinic_a"), connect_timeout=10).start()
    shutil.copyfile(sites / "ca" / "crl.pem", sites / "server" / "crl.pem")
    server = dial("server", sites / "server", "clinic_a", clinic.port)
    try:
        with pytest.raises(TransportTimeout, match=f"certificate of 'clinic_a' was revoked on {day}"):
            server.wait_connected(10)
        assert not clinic.is_connected("server")  # the dialer refused before opening a stream
    finally:
        server.close()
        clinic.close()
        (sites / "server" / "crl.pem").unlink()
    shutil.copyfile(sites / "ca" / "crl.pem", sites / "clinic_a" / "crl.pem")  # its own folder's list names it
    with pytest.raises(CertificateError, match="party 'clinic_a' cannot start: certificate of 'clinic_a' was revoked"):
        load_credentials(sites / "clinic_a", "clinic_a")


def test_expired_certificate_is_refused(sites, tmp_path, caplog):
    old = tmp_path / "old"  # the server's own key, signed again with no validity left
    old.mkdir()
    for f in ("ca.pem", "server.key", "server.csr"):
        shutil.copyfile(sites / "server" / f, old / f)
    [issued] = sign_requests([old / "server.csr"], sites / "ca", days=0)
    when = issued.not_after.strftime("%Y-%m-%d %H:%M UTC")
    with pytest.raises(CertificateError, match=f"'server' cannot start: certificate of 'server' expired on {when}"):
        load_credentials(old, "server")
    # a listener that started anyway (its own check bypassed) is refused by the party that dials it
    creds = Credentials(*((old / f).read_bytes() for f in ("ca.pem", "server.pem", "server.key")), "server", old)
    server = GrpcTransport("server", listen="127.0.0.1:0", accept=["hospital"], credentials=creds,
                           connect_timeout=10).start()
    hospital = dial("hospital", sites / "hospital", "server", server.port)
    try:
        with pytest.raises(TransportTimeout, match=f"certificate of 'server' expired on {when}"):
            hospital.wait_connected(10)
    finally:
        hospital.close()
        server.close()
    [soon] = sign_requests([old / "server.csr"], sites / "ca", days=3)
    with caplog.at_level(logging.WARNING):
        load_credentials(old, "server")
    assert any(f"expires on {soon.not_after.strftime('%Y-%m-%d %H:%M UTC')}, in 3.0 days" in r.getMessage()
               for r in caplog.records)


def request(path: Path, cn: str) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, cn)])).sign(key, hashes.SHA256())
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return path


def test_requests_that_cannot_be_signed_are_refused_with_one_message(sites, tmp_path):
    ledger = (sites / "ca" / "ledger.json").read_text()
    good = request(tmp_path / "good.csr", "clinic_b")
    for i, cn in enumerate(["clinic a", "ca", "crl", "../x", "*"]):
        bad = request(tmp_path / f"bad{i}.csr", cn)
        r = runner.invoke(app, ["sign", str(good), str(bad), "--ca", str(sites / "ca"), "--out", str(tmp_path)])
        assert r.exit_code == 2, r.output
        assert f"{bad}: party name {cn!r} cannot be used in a certificate" in r.output.replace("\n", "")
    # a name already signed, in force, under another key
    r = runner.invoke(app, ["sign", str(request(tmp_path / "h.csr", "hospital")), "--ca", str(sites / "ca")])
    assert r.exit_code == 2 and "'hospital' already has a certificate in force under another key" in r.output
    assert not list(tmp_path.glob("*.pem"))  # nothing signed of a batch with a refused request
    assert (sites / "ca" / "ledger.json").read_text() == ledger
    (tmp_path / "junk.csr").write_text("not a request")
    r = runner.invoke(app, ["sign", str(tmp_path / "junk.csr"), "--ca", str(sites / "ca")])
    assert r.exit_code == 2 and "junk.csr is not a certificate signing request" in r.output
    r = runner.invoke(app, ["keys", "--name", "clinic_a", "--out", str(sites / "clinic_a")])
    assert r.exit_code == 2 and "clinic_a.key exists" in r.output  # a key is never replaced silently
    plan = tmp_path / "noaddr.toml"
    plan.write_text(plan_file(tmp_path, 1).read_text().replace('address = "127.0.0.1:1"', ""))
    r = runner.invoke(app, ["provision", str(plan), "--ca", str(sites / "ca"), "--out", str(tmp_path / "kits")])
    assert r.exit_code == 2 and "entry 'parties.server.address'" in r.output and not (tmp_path / "kits").exists()


def test_run_leaves_no_key_in_tmp_after_sigkill(tmp_path):
    tmp, out = tmp_path / "tmp", tmp_path / "out"  # the launcher's own temporary folder: nothing else writes there
    tmp.mkdir()
    plan = plan_file(tmp_path, free_port())
    launcher = subprocess.Popen([sys.executable, "-m", "splitlearn", "run", str(plan), "--out", str(out), "-q",
                                 "--epochs", "50"], env={**os.environ, "TMPDIR": str(tmp)}, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while sorted(p.name for p in (out / ".certs").glob("*.key")) != ["ca.key", "hospital.key", "server.key"]:
            assert launcher.poll() is None and time.monotonic() < deadline, "no certificates in OUT/.certs"
            time.sleep(0.05)
        assert mode(out / ".certs") == 0o700
    finally:
        kill_tree(launcher.pid)
        launcher.wait(10)
    assert not [p for p in tmp.rglob("*") if p.suffix in (".key", ".pem")]
    leftover = out / ".certs" / "ca.key"
    assert leftover.is_file()  # killed: only the run folder holds them, for its owner alone
    with private_folder(out / ".certs") as fresh:  # and the next run's start removes them
        assert list(Path(fresh).iterdir()) == [] and mode(Path(fresh)) == 0o700
    assert not (out / ".certs").exists()
