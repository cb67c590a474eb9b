"""benchmarks/device_check.py --tiny: every part runs on CPU and writes the JSON and the Markdown table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.mark.slow
def test_device_check_tiny_writes_every_row(tmp_path):
    from asuka.pipelines._registry import available_methods
    from benchmarks.device_check import main

    main(["--tiny", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert [e["method"] for e in report["inference"]] == available_methods()
    for entry in report["inference"]:
        assert entry["eager"]["it_per_s"] > 0 and entry["compiled"]["it_per_s"] > 0, entry
        assert entry["max_abs_diff"] == 0  # the tiny run's eager backend replays the captured graphs exactly
    assert [e["decoder"] for e in report["decoder"]] == ["sd-vae", "harmonizing"]
    assert [(e["stage"], e["gradient_checkpointing"]) for e in report["train"]] == [
        (s, gc) for s in ("mae", "aligner", "decoder") for gc in (False, True)]
    assert all(e["samples_per_s"] > 0 for e in report["train"]), report["train"]
    table = (tmp_path / "device_check.md").read_text()
    for header in ("| method | steps | size | eager it/s | compiled it/s | speedup |",
                   "| decoder | size | eager s | compiled s | speedup |",
                   "| stage | gradient checkpointing | batch | size | step s | samples/s | peak MiB |"):
        assert header in table
