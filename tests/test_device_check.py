"""``python benchmarks/device_check.py --tiny``: every part runs on CPU and writes the JSON and the Markdown tables
whose columns are the ones the README describes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("mae", "aligner", "decoder")


def _readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("### Device check")
    section = text[start:text.index("\n## ", start)]
    return re.sub(r"```.*?```", "", section, flags=re.S)  # prose only: code blocks would pair backticks wrongly


def _tables(markdown: str) -> dict[str, list[list[str]]]:
    """``{section title: rows}`` of each table (header row first, separator dropped)."""
    tables: dict[str, list[list[str]]] = {}
    title = None
    for line in markdown.splitlines():
        if line.startswith("## "):
            title = line[3:].split(" (")[0]
        elif line.startswith("|") and not line.startswith("|---"):
            tables.setdefault(title, []).append([c.strip() for c in line.strip().strip("|").split("|")])
    return tables


@pytest.mark.slow
def test_tiny_device_check_writes_every_row_with_the_readme_columns(tmp_path):
    from asuka.pipelines._registry import available_methods

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "benchmarks/device_check.py", "--tiny", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["mode"] == "tiny" and report["compile_backend"] == "eager" and report["recompile_limit"] == 1
    assert "plumbing" in report["note"]

    assert [e["method"] for e in report["inference"]] == available_methods()  # every method, none skipped
    for entry in report["inference"]:
        for side in ("eager", "compiled"):
            assert "error" not in entry[side], entry
            assert entry[side]["it_per_s"] > 0 and entry[side]["s_per_image"] > 0, entry
        assert entry["max_abs_diff"] == 0  # dynamo's eager backend replays the captured graphs exactly
    assert sum(e["compiled"]["graphs"] for e in report["inference"]) >= 2  # the compiled side went through dynamo
    assert [e["decoder"] for e in report["decoder"]] == ["sd-vae", "harmonizing"]
    assert all(e["max_abs_diff"] == 0 for e in report["decoder"])
    assert [(e["stage"], e["gradient_checkpointing"]) for e in report["train"]] == [
        (s, gc) for s in STAGES for gc in (False, True)]
    assert all("error" not in e and e["samples_per_s"] > 0 and e["precision"] == "bf16-mixed"
               for e in report["train"]), report["train"]

    tables = _tables((tmp_path / "device_check.md").read_text())
    assert list(tables) == ["Inference", "Decoder", "Training"]
    readme = _readme_section()
    described = set(re.findall(r"`([^`]+)`", readme))
    for title, rows in tables.items():
        header, body = rows[0], rows[1:]
        assert set(header[1:]) <= described, (title, set(header[1:]) - described)  # each column is explained
        assert all(len(row) == len(header) for row in body), title
    assert [row[0] for row in tables["Inference"][1:]] == available_methods()
    assert len(tables["Training"]) == 1 + 2 * len(STAGES)
