"""The one error type for bad input anywhere in asuka (library, CLI, evaluation, server).

:class:`InputError` carries the message and the *field* it concerns: a parameter or option name as the library
spells it (``"model"``, ``"method"``, ``"image"``, ``"options.guidance_scale"``, ``"inputs.reference"``...), never
a command-line flag. Front ends map fields to their own spelling: the CLI prints ``--model: ...`` for
``field="model"``; Python users see ``model: ...``. Torch-free, so every module may import it.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input; ``message`` names the problem and the fix, ``field`` the parameter it concerns (or ``None``).

    ``str(err)`` is ``"<field>: <message>"`` (just the message without a field).
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        self.message, self.field = message, field
        super().__init__(f"{field}: {message}" if field else message)

    def __reduce__(self):  # picklable across processes (evaluation workers) with its field
        return type(self), (self.message, self.field)


class InputFileNotFoundError(InputError, FileNotFoundError):
    """A path names no file (both an :class:`InputError` and a ``FileNotFoundError``)."""


__all__ = ["InputError", "InputFileNotFoundError"]
