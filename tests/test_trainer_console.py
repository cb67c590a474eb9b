"""What `python -m trainers.fit` prints: the demo config takes overrides, one step bar, no noise, no silent -v1 files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _fit(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "trainers.fit", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_demo_takes_overrides_prints_one_screen_and_refuses_to_overwrite(tmp_path):
    printed = _fit(tmp_path, "--print_config")
    assert printed.returncode == 0, printed.stderr
    assert "class_path: trainers.mae.MAEModule" in printed.stdout and "max_steps: 800" in printed.stdout

    run = _fit(tmp_path, "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "2")  # < the 50 warm-up steps
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout + run.stderr
    assert "with your overrides" in out and "Training: step" in out and "4/4" in out
    assert "MAEModule:" in out and "trainable" in out
    for noise in ("Tip:", "LeafSpec", "eval mode", "FLOPs", "Epoch 0/-2", "TPU available", "/-2"):
        assert noise not in out, noise
    assert (tmp_path / "checkpoints" / "tiny-mae" / "config.json").is_file()  # the export

    again = _fit(tmp_path, "--trainer.max_steps", "4")
    assert again.returncode == 2
    line = again.stderr.strip().splitlines()[-1]
    assert "already holds checkpoints of an earlier run" in line and "--ckpt_path last" in line
    assert not list((tmp_path / "checkpoints" / "tiny-mae" / "ckpt").glob("*-v1.ckpt"))
