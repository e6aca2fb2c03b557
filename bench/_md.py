"""BENCHMARKS.md is made of sections, each written by one benchmark script."""

from __future__ import annotations

import re
from pathlib import Path

FILE = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEach section is written by the script it names; figures are ratios against a reference measured in\nthe same run.\n"


def write_section(name: str, text: str, file: Path = FILE) -> None:
    """Replace (or append) the section ``name`` of BENCHMARKS.md with ``text``."""
    body = file.read_text() if file.exists() else HEADER
    block = f"<!-- section:{name} -->\n{text.strip()}\n<!-- /section:{name} -->"
    pattern = re.compile(rf"<!-- section:{re.escape(name)} -->.*?<!-- /section:{re.escape(name)} -->", re.S)
    body = pattern.sub(lambda _: block, body) if pattern.search(body) else body.rstrip() + "\n\n" + block + "\n"
    file.write_text(body)
