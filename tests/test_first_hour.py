"""What a new user meets: an uncached hub id offline is one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_offline_hub_id_is_one_clear_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run([sys.executable, "-m", "asuka", "inpaint", "--model", "some-org/some-model", "--steps", "1",
                          "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert "not in the local Hugging Face cache" in lines[0] and "--model" in lines[0]
    assert "stacktrace" not in run.stderr and "Couldn't connect" not in run.stderr
