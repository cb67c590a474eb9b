"""``python -m trainers.fit --config configs/<stage>.yaml [--trainer.devices 8 --trainer.num_nodes 4 ...]``.

LightningCLI over every :class:`trainers.base.StageModule` (``model.class_path``) and LightningDataModule
(``data.class_path``); the resolved configuration is saved as ``config.yaml`` beside the TensorBoard logs;
``--print_config`` prints it. Extra options:

* ``--ckpt_path last|PATH`` resumes (weights, optimizer, scheduler, EMA, step counters). Under SLURM, Lightning's
  ``SLURMEnvironment`` saves an HPC checkpoint on ``SIGUSR1`` and requeues the job; the requeued job resumes from it.
* ``--export_to DIR`` writes the final model with ``save_pretrained`` (EMA weights when present) after training.
* ``--torch_threads N`` sets ``torch.set_num_threads`` (CPU runs).

Without arguments it runs the built-in CPU demo ``configs/tiny/mae.yaml`` (a tiny MAE fine-tuned on the bundled sample
photographs), resolved relative to this package, not the working directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from trainers.base import NonFiniteLossError, StageModule, checkpoint_folder
from trainers.export import export_checkpoint

__all__ = ["DEFAULT_CONFIG", "PAPER_CONFIGS", "main"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny" / "mae.yaml"
PAPER_CONFIGS = REPO_ROOT / "configs"


class AsukaCLI(LightningCLI):
    """LightningCLI with ``--ckpt_path`` and ``--export_to`` at the top level (no subcommands)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="resume from 'last', 'hpc' or a path")
        parser.add_argument("--export_to", type=str | None, default=None, help="save_pretrained folder after training")
        parser.add_argument(
            "--torch_threads", type=int | None, default=None,
            help="torch.set_num_threads for CPU runs (tiny models train fastest with 1 thread beside a data worker)",
        )


def main(args: list[str] | None = None) -> Trainer:
    argv = list(sys.argv[1:] if args is None else args)
    demo = not argv
    cli_args = args
    if demo:
        if not DEFAULT_CONFIG.is_file():
            raise FileNotFoundError(f"built-in demo config {DEFAULT_CONFIG} is missing; pass --config explicitly")
        cli_args = ["--config", str(DEFAULT_CONFIG)]
        print(f"No arguments: running the built-in CPU demo {DEFAULT_CONFIG.relative_to(REPO_ROOT)}", flush=True)
    cli = AsukaCLI(
        StageModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=cli_args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "python -m trainers.fit", "description": __doc__.split("\n\n")[0]},
    )
    trainer = cli.trainer
    if cli.config.torch_threads is not None:
        torch.set_num_threads(cli.config.torch_threads)
    try:
        trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
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
