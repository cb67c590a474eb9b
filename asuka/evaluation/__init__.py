"""``asuka evaluate``: run a method over an evaluation set, score it, split by hole ratio and domain.

Import-light on purpose (the CLI lists this package); the pieces live in submodules:
:mod:`.dataset` (MISATO or image/mask folders), :mod:`.predict` (batched, resumable inference),
:mod:`.scoring` (per-image metrics and Inception features per shard), :mod:`.aggregate` (merge, set-level
metrics, groups), :mod:`.report` (JSON, Markdown, PNG grid), :mod:`.runner` (:func:`~.runner.evaluate`).
"""

METRICS = ("psnr", "ssim", "lpips", "grad", "fid", "kid", "ids", "clip")  # names accepted by --metrics
