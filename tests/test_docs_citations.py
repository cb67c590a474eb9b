"""Code, docstrings, configs and the README cite papers and official repositories: never the project's internal
notes, which users do not have."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INTERNAL = re.compile(r"\.\./shared|\bspecs/|\bDESIGN\.md\b|\bspec §")
SCANNED = ("asuka", "trainers", "configs", "benchmarks", "data", "tests")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sbatch", ".sh", ".js", ".html", ".txt"}


def test_no_citation_of_internal_notes():
    files = [REPO / "README.md"] + [p for folder in SCANNED for p in (REPO / folder).rglob("*")
                                     if p.suffix in SUFFIXES and p.is_file() and p.name != Path(__file__).name]
    hits = [f"{p.relative_to(REPO)}:{n}" for p in files
            for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if INTERNAL.search(line)]
    assert not hits, "cite the paper section or the official repository's file instead: " + ", ".join(hits[:20])
