"""The command that exports a trained party's segments for serving: export."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..core.specs import PlanError
from . import _fail, app, console


@app.command()
def export(run_dir: Path = typer.Argument(..., help="a run folder (--out of 'splitlearn run')"),
           party: str = typer.Option(..., "--party", help="the party whose segments to export"),
           format: str = typer.Option("onnx", "--format", help="the file format (onnx)"),
           out: Optional[Path] = typer.Option(None, "--out", help="folder for the files (default RUN_DIR/export/PARTY)"),
           fold: bool = typer.Option(True, "--fold/--no-fold", help="fold the party's standardisation into the graphs "
                                     "(--no-fold: saved beside them as preprocess.json, to apply before)"),
           force: bool = typer.Option(False, "--force", help="replace an earlier export in --out")) -> None:
    """Write PARTY's trained segments as files another inference stack runs: one SEGMENT.onnx each (inputs named
    after what feeds them, batch size dynamic, the party's preprocessing folded in), and manifest.json (inputs,
    outputs, shapes, where each comes from and goes, the preprocessing, sha256 of each file)."""
    from ..tools.export import export_party

    try:
        files = export_party(run_dir, party, out, format, fold=fold, force=force)
    except PlanError as e:
        _fail(str(e))
    for f in files:
        console.print(f"wrote {f}", highlight=False, markup=False, soft_wrap=True)
