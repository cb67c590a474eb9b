"""``python -m trainers.fit``: the built-in tiny MAE config end to end (shortened), saved config, TensorBoard, export."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from asuka.models.mae import MAEPrior
from trainers.export import load_stage_module
from trainers.fit import DEFAULT_CONFIG, REPO_ROOT, main


def _short_tiny_config(tmp_path, steps=4):
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    run = tmp_path / "run"
    trainer = config["trainer"]
    trainer.update(max_steps=steps, val_check_interval=2, log_every_n_steps=1, default_root_dir=str(run),
                   enable_progress_bar=False)
    trainer["logger"]["init_args"]["save_dir"] = str(run)
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"].update(dirpath=str(run / "ckpt"), every_n_train_steps=2)
    config["model"]["init_args"]["warmup_steps"] = 1
    config["data"]["init_args"].update(num_workers=0, epoch_batches=steps, sample_root=str(tmp_path / "samples"))
    config["export_to"] = str(tmp_path / "export")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, run


def test_default_config_is_the_packaged_tiny_mae():
    assert DEFAULT_CONFIG == REPO_ROOT / "configs" / "tiny" / "mae.yaml" and DEFAULT_CONFIG.is_file()
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert config["model"]["class_path"] == "trainers.mae.MAEModule"
    assert config["export_to"].startswith("checkpoints/")


def test_fit_writes_config_tensorboard_checkpoints_and_an_identical_export(tmp_path, capsys):
    config, run = _short_tiny_config(tmp_path)
    trainer = main(["--config", str(config)])
    out = capsys.readouterr().out
    assert "TensorBoard logs" in out and str(tmp_path / "export") in out

    log_dir = run / "logs" / "version_0"
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["model"]["class_path"] == "trainers.mae.MAEModule" and saved["trainer"]["max_steps"] == 4

    events = EventAccumulator(str(log_dir))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/grad_norm", "train/samples_per_sec", "train/skipped_steps",
            "data/skipped_samples", "lr/decay", "lr/no_decay", "val/loss"} <= scalars
    assert events.Tags()["images"] == ["val/images/input | masked | prediction | composite"]
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1, 2, 3]

    assert {p.name for p in (run / "ckpt").iterdir()} >= {"last.ckpt", "final.ckpt", "epoch=0-step=2.ckpt"}
    exported = MAEPrior.from_pretrained(tmp_path / "export")
    module = load_stage_module(run / "ckpt" / "final.ckpt")  # EMA weights, as exported
    image = torch.rand(2, 3, 80, 72, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = (torch.rand(2, 1, 80, 72, generator=torch.Generator().manual_seed(1)) > 0.6).float()
    with torch.no_grad():
        a, b = exported.prior(image, mask), module.model.prior(image, mask)
    assert torch.equal(a.features, b.features) and torch.equal(a.image, b.image)
    assert trainer.global_step == 4


def test_export_command_line(tmp_path):
    config, run = _short_tiny_config(tmp_path, steps=2)
    main(["--config", str(config), "--export_to", "null",
          "--trainer.limit_val_batches", "0"])
    result = subprocess.run(
        [sys.executable, "-m", "trainers.export", "--ckpt", str(run / "ckpt" / "last.ckpt"), "--out",
         str(tmp_path / "cli-export"), "--no-ema"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    exported = MAEPrior.from_pretrained(tmp_path / "cli-export")
    raw = torch.load(run / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(exported.decoder_pred.weight, raw["model.decoder_pred.weight"])


def test_print_config_and_bad_arguments():
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(DEFAULT_CONFIG), "--print_config"])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(DEFAULT_CONFIG), "--model.init_args.mask_ratio", "not-a-number"])
    assert exit_info.value.code != 0
