"""Every ```python block of README.md runs offline as written (tiny components, CPU), so the README cannot drift.

The blocks run one after another in a fresh process, each in its own namespace, in a folder that holds what the
README's snippets name: ``photo.png`` and ``reference.png`` (256×256 photographs), ``mask.png`` (256×256, white =
hole), and stand-ins for what a user downloads or trains — metric backbones with random weights in the real layouts
under ``ckpt/``, the published MAE and decoder checkpoints in their key layouts (tiny shapes), the exports the
README's training commands write (``checkpoints/{mae,aligner,decoder/export}``, tiny), a MISATO-shaped folder
``path/to/MISATO`` and a tiny COCO file ``instances_train2017.json``. Hub ids appear only in comments. A failure names
the block's first line in README.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import json

import numpy as np
import pytest
import skimage.data
import torch
import torchvision
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

_RUNNER = textwrap.dedent('''
    import sys
    blocks = {blocks!r}
    failed = []
    for line, code in blocks:
        try:
            exec(compile(code, f"README.md:{{line}}", "exec"), {{"__name__": "__readme__"}})
        except BaseException as error:  # noqa: BLE001 - report every block
            failed.append(" ".join(f"README.md block at line {{line}}: {{type(error).__name__}}: {{error}}".split())[:400])
    print("\\n".join(failed), file=sys.stderr)
    sys.exit(1 if failed else 0)
''')


def readme_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every ```python block."""
    return [(text[:m.start()].count("\n") + 2, m.group(1)) for m in _BLOCK.finditer(text)]


def _stand_ins(folder: Path) -> None:
    """Files with the names and layouts the README's snippets use (random weights, tiny data)."""
    from asuka.metrics import save_random_inception_weights

    ckpt = folder / "ckpt"
    ckpt.mkdir()
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), ckpt / "alexnet-owt-7be5be79.pth")
    save_random_inception_weights(ckpt / "weights-inception-2015-12-05-6726825d.pth")
    misato = folder / "path" / "to" / "MISATO" / "512"
    photos = [skimage.data.astronaut(), skimage.data.coffee()]
    for sub in ("image", "mask"):
        (misato / sub).mkdir(parents=True)
    for j, index in enumerate((0, 500)):
        Image.fromarray(photos[j]).resize((64, 64)).save(misato / "image" / f"{index:04d}.png")
        hole = np.zeros((64, 64), np.uint8)
        hole[16:40, 12:44] = 255
        Image.fromarray(hole).save(misato / "mask" / f"{index:04d}.png")
    coco = {"images": [{"id": 1, "width": 64, "height": 64}], "categories": [{"id": 1, "name": "thing"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 600.0,
                             "segmentation": [[10, 10, 50, 12, 40, 50, 12, 44]]}]}
    (folder / "instances_train2017.json").write_text(json.dumps(coco))
    _model_stand_ins(folder)


def _model_stand_ins(folder: Path) -> None:
    import test_convert_mae  # the published key layouts, tiny shapes (tests/ is on sys.path)
    from test_decoder import _to_ldm

    from asuka.models.aligner import PriorAligner
    from asuka.models.decoder import HarmonizingDecoderKL
    from asuka.models.mae import MAEPrior
    from asuka.models.tiny import TINY_CROSS_ATTENTION_DIM, tiny_vae

    mae = MAEPrior.tiny()
    mae.save_pretrained(folder / "checkpoints" / "mae")
    torch.manual_seed(0)
    PriorAligner(in_dim=mae.feature_dim, cross_attention_dim=TINY_CROSS_ATTENTION_DIM, num_blocks=1,
                 head_dim=16).save_pretrained(
        folder / "checkpoints" / "aligner")
    HarmonizingDecoderKL.from_vae(tiny_vae()).save_pretrained(folder / "checkpoints" / "decoder" / "export")
    # widths the converters infer heads for without options, as for the real ViT-B files: 64-d encoder heads,
    # 16 decoder heads
    test_convert_mae.EMBED, test_convert_mae.DEC = 64, 32
    torch.save({"model": test_convert_mae._mae_layout(16, cls_token=False, finetune=True)}, folder / "mae_300.pth")
    for name in ("mae_visualize_vit_base.pth", "mae_pretrain_vit_base_full.pth"):
        torch.save({"model": test_convert_mae._mae_layout(14, cls_token=True, finetune=False)}, folder / name)
    base = HarmonizingDecoderKL.from_vae(tiny_vae(), condition_channels=3, mask_downsample="nearest")
    torch.save({"state_dict": _to_ldm(base.state_dict())}, folder / "base.ckpt")


def test_readme_blocks_are_found():
    blocks = readme_blocks("x\n```python\nprint(1)\n```\n```bash\nls\n```\n```python\na = 2\n```\n")
    assert blocks == [(3, "print(1)\n"), (9, "a = 2\n")]


@pytest.mark.slow
def test_every_readme_python_block_runs_offline(tmp_path):
    blocks = readme_blocks((REPO / "README.md").read_text())
    assert blocks, "README.md has no Python blocks"
    Image.fromarray(skimage.data.astronaut()).resize((256, 256), Image.Resampling.BICUBIC).save(tmp_path / "photo.png")
    Image.fromarray(skimage.data.chelsea()).resize((256, 256), Image.Resampling.BICUBIC).save(
        tmp_path / "reference.png")
    mask = np.zeros((256, 256), np.uint8)
    mask[72:184, 88:168] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    _stand_ins(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", _RUNNER.format(blocks=blocks)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[:12000]
