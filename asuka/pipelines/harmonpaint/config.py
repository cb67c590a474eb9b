"""The resolved HarmonPaint options a pipeline call runs with (declared, with sources, in
:mod:`asuka.pipelines.harmonpaint.options`)."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

from asuka.pipelines.harmonpaint.options import PIPELINE_SPEC


class HarmonPaintConfig(SimpleNamespace):
    """Every HarmonPaint option as an attribute: the declared defaults, overridden by keywords."""

    @classmethod
    def from_options(cls, **options: Any) -> "HarmonPaintConfig":
        """Resolve ``options`` against the declarations; an unknown name or a bad value is an ``InputError``
        with field ``options.<name>``. Paths (``diagnostics_dir``) may be ``os.PathLike``."""
        options = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in options.items()}
        return cls(**PIPELINE_SPEC.resolve(values=options))
