"""``python -m trainers.fit --config configs/<stage>.yaml [--trainer.devices 8 --trainer.num_nodes 4 ...]``.

LightningCLI over every :class:`trainers.base.StageModule` (``model.class_path``) and LightningDataModule
(``data.class_path``); the resolved configuration is saved as ``config.yaml`` beside the TensorBoard logs;
``--print_config`` prints it. Extra options:

* ``--ckpt_path last|PATH`` resumes (weights, optimizer, scheduler, EMA, step counters and the position of the
  training data stream, so the resumed run sees exactly the batches the uninterrupted run would). ``last`` is the
  newest *readable* checkpoint of the run's checkpoint folder (a truncated newer one is skipped with a warning).
  Checkpoints are written atomically (:mod:`trainers.checkpoint_io`) and read with ``weights_only=True``. Under SLURM,
  Lightning's ``SLURMEnvironment`` saves an HPC checkpoint on ``SIGUSR1`` and requeues the job; the requeued job
  resumes from it and never replays data it already trained on.
* ``--export_to DIR`` writes the final model with ``save_pretrained`` (EMA weights when present) after training.
* ``--torch_threads N`` sets ``torch.set_num_threads`` (CPU runs).

Bad arguments and files (a missing ``init_from``, an empty shard list, a checkpoint of another model) end the command
with a one-line ``python -m trainers.fit: error: ...`` on stderr and exit status 2, without a traceback.

Without ``--config`` it runs the built-in CPU demo ``configs/tiny/mae.yaml`` (a tiny MAE fine-tuned on the bundled
sample photographs; resolved relative to this package, not the working directory), and other options override it:
``python -m trainers.fit --trainer.max_steps 10``; ``--print_config`` shows it.

A run that starts from scratch (no ``--ckpt_path``) into a checkpoint folder that already holds checkpoints is refused
before any work: continue that run with ``--ckpt_path last``, or choose another folder (``trainer.default_root_dir``
and the ``ModelCheckpoint`` ``dirpath``), or delete it. (Lightning would write ``-v1`` files beside the old ones.)
A SLURM requeue, which Lightning resumes from its HPC checkpoint, is not affected. ``final.ckpt`` in that folder is the
checkpoint at the end of training from which ``--export_to`` exports; resuming a finished run rewrites it.
"""

from __future__ import annotations

import pickle
import re
import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from trainers.base import NonFiniteLossError, StageModule, checkpoint_folder
from trainers.checkpoint_io import AtomicCheckpointIO, resolve_resume_path
from trainers.checks import run_command
from trainers.console import StepProgressBar, quiet_lightning
from trainers.export import export_checkpoint

__all__ = ["DEFAULT_CONFIG", "PAPER_CONFIGS", "main"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny" / "mae.yaml"
PAPER_CONFIGS = REPO_ROOT / "configs"


class AsukaCLI(LightningCLI):
    """LightningCLI with ``--ckpt_path`` and ``--export_to`` at the top level (no subcommands)."""

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        if config.get("enable_progress_bar", True) is not False:  # the step bar replaces Lightning's default bar
            callbacks = [*callbacks, StepProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="resume from 'last', 'hpc' or a path")
        parser.add_argument("--export_to", type=str | None, default=None, help="save_pretrained folder after training")
        parser.add_argument(
            "--torch_threads", type=int | None, default=None,
            help="torch.set_num_threads for CPU runs (tiny models train fastest with 1 thread beside a data worker)",
        )


def main(args: list[str] | None = None) -> Trainer:
    """Run the command; bad arguments and files raise ``SystemExit(2)`` after a one-line message."""
    return run_command("python -m trainers.fit", _main, args)


def _main(args: list[str] | None) -> Trainer:
    argv = list(sys.argv[1:] if args is None else args)
    quiet_lightning()
    demo = not any(a == "--config" or a.startswith("--config=") for a in argv)
    cli_args = argv
    if demo:
        if not DEFAULT_CONFIG.is_file():
            raise FileNotFoundError(f"built-in demo config {DEFAULT_CONFIG} is missing; pass --config explicitly")
        cli_args = ["--config", str(DEFAULT_CONFIG), *argv]
        if not any(a in ("-h", "--help") or a.startswith("--print_config") for a in argv):
            print(f"No --config: running the built-in CPU demo {DEFAULT_CONFIG.relative_to(REPO_ROOT)}"
                  f"{' with your overrides' if argv else ''}", flush=True)
    cli = AsukaCLI(
        StageModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=cli_args,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"enable_model_summary": False},
        parser_kwargs={"prog": "python -m trainers.fit", "description": __doc__.split("\n\n")[0]},
    )
    trainer = cli.trainer
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default: make the writes atomic
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    if cli.config.torch_threads is not None:
        torch.set_num_threads(cli.config.torch_threads)
    ckpt_path = resolve_resume_path(cli.config.ckpt_path, checkpoint_folder(trainer))
    if cli.config.ckpt_path is None:
        _refuse_earlier_run(trainer)
    try:
        trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, weights_only=True)
    except pickle.UnpicklingError as error:  # the checkpoint names code: refused by weights_only=True
        found = re.search(r"GLOBAL (\S+)", str(error))
        raise ValueError(f"--ckpt_path {ckpt_path} cannot be read with weights_only=True: it asks for "
                         f"{found.group(1) if found else 'objects other than tensors and plain values'}; "
                         "only checkpoints written by python -m trainers.fit are accepted") from error
    except NonFiniteLossError as error:
        print(f"\nTraining stopped: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from error
    if trainer.interrupted:
        print("\nTraining was interrupted; resume with --ckpt_path last (nothing exported).", flush=True)
        return trainer
    export_to = cli.config.export_to
    exported = None
    if export_to:
        final = checkpoint_folder(trainer) / "final.ckpt"
        trainer.save_checkpoint(final, weights_only=False)
        if trainer.is_global_zero:
            exported = export_checkpoint(final, export_to)
    if trainer.is_global_zero:
        _summary(trainer, exported, demo)
    return trainer


def _refuse_earlier_run(trainer: Trainer) -> None:
    """A fresh run must not write beside an earlier run's checkpoints (SLURM requeues resume and pass)."""
    folder = checkpoint_folder(trainer)
    earlier = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
    if earlier and trainer._checkpoint_connector._hpc_resume_path is None:
        shown = ", ".join(earlier[:3]) + (", ..." if len(earlier) > 3 else "")
        raise ValueError(f"{folder} already holds checkpoints of an earlier run ({shown}); continue it with "
                         "--ckpt_path last, or start over in another folder (--trainer.default_root_dir and the "
                         "checkpoint dirpath) or after deleting this one")


def _summary(trainer: Trainer, exported: Path | None, demo: bool) -> None:
    lines = ["", "Training finished."]
    if trainer.log_dir:
        lines.append(f"  TensorBoard logs + resolved config: {trainer.log_dir}  (view: tensorboard --logdir {trainer.log_dir})")
    callback = trainer.checkpoint_callback
    if getattr(callback, "dirpath", None):
        lines.append(f"  resumable checkpoints: {callback.dirpath}  (resume: add --ckpt_path last)")
    if exported is not None:
        lines.append(f"  exported model (save_pretrained): {exported}")
    if demo:
        lines += [
            "  paper-scale run (ViT-B/16 at 256², effective batch 1024, bf16) on 8 GPUs:",
            "    python -m trainers.fit --config configs/mae.yaml",
            "  on 4 nodes x 8 GPUs (same effective batch):",
            "    python -m trainers.fit --config configs/mae.yaml --trainer.num_nodes 4 --data.init_args.batch_size 32",
            "  on SLURM (auto-requeue): sbatch configs/slurm/mae.sbatch",
        ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
