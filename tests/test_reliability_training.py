"""Reliability of training (issue 17): exact resume of the data stream after SIGKILL, failing shards, atomic
checkpoints with a readable fallback, checkpoints that cannot run code, one-line command errors."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from asuka.data.pipeline import DataStreamError
from asuka.data.samples import ensure_sample_shards
from asuka.data.shards import encode_image, write_shards
from trainers.datamodule import InpaintingDataModule
from trainer_support import TINY_MAE, mae_fit_config

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return ensure_sample_shards(tmp_path_factory.mktemp("samples"))


def _fit_config(folder: Path, sample_root: Path, *, max_steps: int, every: int, callbacks=(), data=None) -> dict:
    data = {"class_path": "trainers.datamodule.InpaintingDataModule",
            "init_args": {"train_shards": None, "sample_root": str(sample_root), "resolution": 32, "batch_size": 4,
                          "num_workers": 2, "epoch_batches": 4, "seed": 3, **(data or {})}}
    return {**mae_fit_config(folder, max_steps=max_steps, every=every, data=data, callbacks=callbacks),
            "torch_threads": 1}


def _fit(tmp_path: Path, name: str, config: dict, *args: str, env=None) -> subprocess.CompletedProcess:
    """``python -m trainers.fit`` in a fresh process (slow to start on a busy machine: use for kills and env)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "trainers.fit", "--config", str(path), *args], cwd=REPO,
                          env=env or ENV, capture_output=True, text=True, timeout=300)


def _fit_here(tmp_path: Path, name: str, config: dict, *args: str) -> int:
    """``trainers.fit.main`` in this process; returns the exit status (0, or the SystemExit code)."""
    from trainers.fit import main

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    threads, argv = torch.get_num_threads(), sys.argv
    sys.argv = ["trainers.fit"]  # not pytest's own arguments (LightningCLI warns about both)
    try:
        main(["--config", str(path), *args])
    except SystemExit as exit_info:
        return exit_info.code
    finally:
        torch.set_num_threads(threads)
        sys.argv = argv
    return 0


# ------------------------------------------------------------------------------------------------ exact resume


def test_sigkilled_run_resumes_the_exact_stream_with_two_workers(tmp_path, sample):
    """Killed (SIGKILL) at step 5 — neither a checkpoint (every 3) nor an epoch boundary (every 4) — and resumed
    with --ckpt_path last: every step trains on the same samples, crops and masks and logs the same loss, to the
    last bit, as the uninterrupted run; the steps between the checkpoint and the kill are redone identically."""
    root = tmp_path / "samples-root"
    ensure_sample_shards(root)

    def log(name: str) -> list[list[str]]:
        return [line.split(" ") for line in (tmp_path / f"{name}.txt").read_text().splitlines()]

    def config(name: str, *extra: dict) -> dict:
        return _fit_config(tmp_path / name, root, max_steps=10, every=3, callbacks=[
            {"class_path": "trainer_support.BatchLog", "init_args": {"path": str(tmp_path / f"{name}.txt")}},
            *extra])

    assert _fit_here(tmp_path, "full", config("full")) == 0
    killed = _fit(tmp_path, "killed", config("killed", {"class_path": "trainer_support.KillAt",
                                                        "init_args": {"step": 5}}))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [int(r[0]) for r in log("killed")] == [1, 2, 3, 4, 5]
    assert _fit_here(tmp_path, "resumed", config("killed"), "--ckpt_path", "last") == 0

    full, interrupted = log("full"), log("killed")
    assert [int(r[0]) for r in full] == list(range(1, 11))
    assert [int(r[0]) for r in interrupted] == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 10]  # resumed after step 3
    by_step = {row[0]: row for row in full}
    for row in interrupted:
        assert row == by_step[row[0]]  # loss repr, sample keys, image and mask checksums
    assert len({row[2] for row in full}) == 10  # the stream moves on: no batch repeats


def test_loader_position_round_trips_through_state_dict(sample):
    """The loader restored from a mid-epoch state gives the batches the original loader gave from there on."""
    def dm():
        module = InpaintingDataModule(train_shards=sample["train"], resolution=32, batch_size=2, num_workers=2,
                                      epoch_batches=3, seed=5)
        module.setup("fit")
        return module

    first = dm()
    loader = first.train_dataloader()
    reference = [b for _ in range(3) for b in loader]  # 3 epochs = 9 batches
    state = None
    second = dm()
    again = second.train_dataloader()
    for batch in again:
        second.on_before_batch_transfer(batch, 0)
        if batch["key"] == reference[1]["key"]:
            state = again.state_dict()
            break
    assert state == {"position": 2}
    resumed_dm = dm()
    resumed = resumed_dm.train_dataloader()
    resumed.load_state_dict(state)
    rest = [b for _ in range(3) for b in resumed]  # the rest of epoch 0, then epochs 1 and 2
    assert len(rest) == 7
    for a, b in zip(reference[2:], rest):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


# ------------------------------------------------------------------------------------------------ failing shards


def _empty_shard(path: Path) -> str:
    with tarfile.open(path, "w"):
        pass
    return str(path)


def _undecodable_shard(path: Path, n: int = 6) -> str:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            info = tarfile.TarInfo(f"bad{i}.jpg")
            info.size = 7
            tar.addfile(info, io.BytesIO(b"garbage"))
    return str(path)


def _good_shards(folder: Path, n: int = 8) -> list[str]:
    rng = np.random.default_rng(0)
    samples = [{"__key__": f"good_{i}", "jpg": encode_image(rng.integers(0, 256, (40, 40, 3), np.uint8))}
               for i in range(n)]
    return [str(p) for p in write_shards(samples, folder, "good", maxcount=n)]


def _datamodule(shards, **kw):
    dm = InpaintingDataModule(train_shards=shards, resolution=32, batch_size=4, num_workers=0, epoch_batches=3, **kw)
    dm.setup("fit")
    return dm


def test_an_empty_shard_alone_stops_at_once_and_beside_good_ones_is_skipped(tmp_path):
    empty = _empty_shard(tmp_path / "empty-000000.tar")
    with pytest.raises(DataStreamError, match=r"no training sample can be read.*empty-000000.tar: holds no samples"):
        _datamodule([empty]).train_dataloader()
    good = _good_shards(tmp_path)
    dm = _datamodule([empty, *good])
    with pytest.warns(UserWarning, match="1 of 2 training shards are failing and skipped.*empty-000000"):
        loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == 3 and all(k.startswith("good") for b in batches for k in b["key"])
    assert dm.failing_shards == 1


def test_a_shard_whose_samples_all_fail_stops_or_is_skipped_and_counted(tmp_path):
    bad = _undecodable_shard(tmp_path / "bad-000000.tar", n=20)
    with pytest.raises(DataStreamError, match="max_failure_ratio"):
        next(iter(_datamodule([bad]).train_dataloader()))
    good = _good_shards(tmp_path, n=40)
    batches = list(_datamodule([bad, *good]).train_dataloader())  # 20 bad of 60 samples: skipped and counted
    assert all(k.startswith("good") for b in batches for k in b["key"])
    assert sum(int(b["skipped"]) for b in batches) > 0


def test_fit_with_only_an_empty_shard_ends_with_one_line_within_seconds(tmp_path, capsys):
    empty = _empty_shard(tmp_path / "empty-000000.tar")
    config = _fit_config(tmp_path / "run", tmp_path / "unused", max_steps=2, every=1,
                         data={"train_shards": [empty], "num_workers": 2})
    assert _fit_here(tmp_path, "empty", config) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m trainers.fit: error: no training sample can be read: all 1 shards")


# ------------------------------------------------------------------------------------------------ no code from files


class _RunsCode:
    """Pickles as a call of ``os.system`` (what a crafted checkpoint holds)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_export_builds_only_stage_classes_and_names_what_the_file_asked_for(tmp_path, capsys):
    from trainers.export import main as export_main

    marker = tmp_path / "marker"
    crafted = tmp_path / "crafted.ckpt"  # passes weights_only=True: only strings and dicts
    torch.save({"asuka": {"module_class": "os.system"}, "state_dict": {},
                "hyper_parameters": {"command": f"touch {marker}"}}, crafted)
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--ckpt", str(crafted), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and not marker.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "asks to build 'os.system', which is not a stage class" in err[0]
    assert "trainers.mae.MAEModule" in err[0]


def test_resume_never_unpickles_code_even_when_torch_is_told_to(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "marker"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode(f"touch {marker}")}, crafted)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's default would unpickle anything
    root = tmp_path / "samples-root"
    config = _fit_config(tmp_path / "run", root, max_steps=2, every=1, data={"num_workers": 0})
    assert _fit_here(tmp_path, "crafted", config, "--ckpt_path", str(crafted)) == 2
    assert not marker.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"python -m trainers.fit: error: --ckpt_path {crafted}") and "posix.system" in err[-1]


def test_lpips_heads_are_read_without_code(tmp_path, monkeypatch):
    import torchvision

    from asuka.metrics.lpips import LPIPS

    marker = tmp_path / "marker"
    backbone = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), backbone)
    crafted = tmp_path / "heads.pth"
    torch.save({"lin0.model.1.weight": _RunsCode(f"touch {marker}")}, crafted)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ValueError, match="weights_only=True"):
        LPIPS("alex", backbone, linear_weights=crafted)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ checkpoints


def test_truncated_last_checkpoint_falls_back_to_the_newest_readable_one(tmp_path, capsys):
    root = tmp_path / "samples-root"
    config = _fit_config(tmp_path / "run", root, max_steps=4, every=2, data={"num_workers": 0})
    assert _fit_here(tmp_path, "first", config) == 0
    ckpt = tmp_path / "run" / "ckpt"
    last = ckpt / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a write cut short
    config["trainer"]["max_steps"] = 6
    with pytest.warns(UserWarning, match=r"skipped last.ckpt \(unreadable .*resuming from .*step=4.ckpt"):
        assert _fit_here(tmp_path, "resume", config, "--ckpt_path", "last") == 0
    assert torch.load(last, weights_only=True)["global_step"] == 6  # rewritten whole
    assert not list(ckpt.glob(".*"))  # no temporary file left

    capsys.readouterr()
    config["model"]["init_args"]["model"] = {**TINY_MAE, "embed_dim": 32}  # another model: mis-shaped tensors
    config["trainer"]["max_steps"] = 8
    assert _fit_here(tmp_path, "other", config, "--ckpt_path", str(last)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m trainers.fit: error: the checkpoint does not fit the model: size mismatch")


def test_checkpoint_writes_are_atomic(tmp_path):
    from trainers.checkpoint_io import AtomicCheckpointIO

    class Unpicklable:
        def __reduce__(self):
            raise OSError("No space left on device")  # the write fails half-way

    path = tmp_path / "last.ckpt"
    io_plugin = AtomicCheckpointIO()
    io_plugin.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    with pytest.raises(OSError, match="No space left"):
        io_plugin.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "x": Unpicklable()}, path)
    assert torch.equal(io_plugin.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))  # the old one, whole
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


@pytest.mark.parametrize("change, message", [
    ({"data": {"train_shards": []}}, "train_shards is empty; pass at least one shard"),
    ({"model": {"init_from": "/nonexistent/mae"}}, "init_from='/nonexistent/mae' does not exist"),
])
def test_bad_fit_arguments_give_one_line(tmp_path, capsys, change, message):
    config = _fit_config(tmp_path / "run", tmp_path / "root", max_steps=1, every=1, data={"num_workers": 0})
    for section, values in change.items():
        config[section]["init_args"].update(values)
    assert _fit_here(tmp_path, "bad", config) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m trainers.fit: error: ") and message in err[-1]


def test_the_allow_list_is_every_stage_class_of_the_trainers_package():
    from trainers.base import StageModule
    from trainers.export import stage_classes

    allowed = stage_classes()
    assert {"trainers.mae.MAEModule", "trainers.aligner.AlignerModule", "trainers.decoder.DecoderModule"} <= set(allowed)
    assert all(issubclass(cls, StageModule) for cls in allowed.values())
    assert "os.system" not in allowed and "trainers.base.StageModule" not in allowed
    assert "trainers.alignment.AlignmentStage" not in allowed  # abstract: shared by the two aligner stages
