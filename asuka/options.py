"""Typed declarations of a method's options, presets and extra inputs (torch-free).

One :class:`MethodSpec` per method, given to :func:`asuka.pipelines._registry.register_method`, is read by every
front end: ``asuka inpaint --set KEY=VALUE / --preset NAME / --describe [--json]``, ``asuka evaluate``, the Python
API (:mod:`asuka.api`), the web UI (the JSON schema of :meth:`MethodSpec.schema`) and the README tables
(:meth:`MethodSpec.markdown`). A method never parses arguments itself.

- :class:`Option`: a scalar or list knob with a type, a default (the paper's), an allowed range or choices, a
  one-line help and its source (paper section or official file).
- :class:`Preset`: named option values (e.g. a paper's per-experiment settings).
- :class:`Input`: an extra input by *role* (``prompt``, ``negative_prompt``, ``reference``, ``control_image``,
  ``ip_adapter_image``...), ``text`` or ``image``, required or not. Image inputs marked ``aligned`` have the input
  image's size and are cropped/resized/padded with it.
- :class:`Weights`: an extra load-time weight reference (a ControlNet, an IP-Adapter, a LoRA...): a folder, file or
  hub id passed to the method's builder as a keyword argument.

Values resolve as: declared defaults < preset < explicit values; every value is type- and range-checked, and a
bad one is an :class:`~asuka.errors.InputError` whose ``field`` is ``options.<name>`` (``inputs.<role>`` for inputs).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from asuka.errors import InputError

OPTION_TYPES = ("int", "float", "bool", "str", "int_list", "float_list", "str_list")
INPUT_KINDS = ("text", "image")
STANDARD_ROLES: dict[str, str] = {
    "prompt": "text", "negative_prompt": "text", "reference": "image", "control_image": "image",
    "ip_adapter_image": "image",
}
"""Roles front ends know by name (CLI flag ``--<role with dashes>``) and the kind each has; other roles are allowed
and reached through ``--input ROLE=VALUE``."""

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_JSON_TYPES = {"int": "integer", "float": "number", "bool": "boolean", "str": "string"}


@dataclass(frozen=True)
class Option:
    """One knob of a method.

    ``type`` is one of :data:`OPTION_TYPES` (``*_list`` values are tuples, written ``1,2,3`` on the command line);
    ``min``/``max`` bound numbers (and each list element) inclusively, ``min_exclusive`` makes ``min`` strict;
    ``choices`` restricts the values (each list element); ``nullable`` allows ``None`` (``none`` on the command line).
    ``source`` names where the default comes from: a paper section or an official repository's file.
    """

    name: str
    type: str
    default: Any
    help: str
    source: str = ""
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    choices: tuple | None = None
    nullable: bool = False

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"option name {self.name!r} must be a Python identifier")
        if self.type not in OPTION_TYPES:
            raise ValueError(f"option {self.name!r}: type must be one of {OPTION_TYPES}, got {self.type!r}")
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))
        if not self.help:
            raise ValueError(f"option {self.name!r}: a one-line help is required")
        try:  # the default must satisfy its own rules
            object.__setattr__(self, "default", self.check(self.default))
        except InputError as err:
            raise ValueError(f"option {self.name!r}: bad default: {err.message}") from None

    @property
    def is_list(self) -> bool:
        return self.type.endswith("_list")

    @property
    def scalar(self) -> str:
        return self.type.removesuffix("_list")

    # ----------------------------------------------------------------------------------------- values
    def parse(self, text: str) -> Any:
        """A command-line string -> a checked value (``none`` for ``None``, ``a,b,c`` for lists)."""
        if self.nullable and text.strip().lower() in ("none", "null"):
            return None
        if self.is_list:
            parts = [p.strip() for p in text.split(",")] if text.strip() else []
            return self.check(tuple(self._parse_scalar(p) for p in parts))
        return self.check(self._parse_scalar(text.strip() if self.scalar != "str" else text))

    def _parse_scalar(self, text: str) -> Any:
        kind = self.scalar
        try:
            if kind == "int":
                return int(text)
            if kind == "float":
                return float(text)
        except ValueError:
            raise self._error(f"expected {'an integer' if kind == 'int' else 'a number'}, got {text!r}") from None
        if kind == "bool":
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise self._error(f"expected true/false, got {text!r}")
        return text

    def check(self, value: Any) -> Any:
        """A Python value -> the checked, normalised value (ints accepted for floats, lists as tuples)."""
        if value is None:
            if self.nullable:
                return None
            raise self._error(f"None is not allowed; {self._rule()}")
        if self.is_list:
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise self._error(f"expected a list of {self.scalar}s, got {value!r}")
            return tuple(self._check_scalar(v) for v in value)
        return self._check_scalar(value)

    def _check_scalar(self, value: Any) -> Any:
        kind = self.scalar
        if kind == "bool":
            if not isinstance(value, bool):
                raise self._error(f"expected true/false, got {value!r}")
        elif kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise self._error(f"expected an integer, got {value!r}")
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self._error(f"expected a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise self._error(f"expected a finite number, got {value!r}")
        elif not isinstance(value, str):
            raise self._error(f"expected text, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise self._error(f"{value!r} is not one of the choices: {', '.join(map(str, self.choices))}")
        too_low = self.min is not None and (value <= self.min if self.min_exclusive else value < self.min)
        if too_low or (self.max is not None and value > self.max):
            raise self._error(f"{value!r} is out of range; {self._rule()}")
        return value

    def _rule(self) -> str:
        if self.choices is not None:
            return f"choose one of {', '.join(map(str, self.choices))}"
        lo = "" if self.min is None else f"{'>' if self.min_exclusive else '>='} {self.min:g}"
        hi = "" if self.max is None else f"<= {self.max:g}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        return f"expected {self.type}{' ' + bounds if bounds else ''}"

    def _error(self, message: str) -> InputError:
        return InputError(message, f"options.{self.name}")

    # ------------------------------------------------------------------------------------ description
    def allowed(self) -> str:
        """The allowed values in words, for tables."""
        if self.choices is not None:
            text = " / ".join(map(str, self.choices))
        elif self.min is not None or self.max is not None:
            lo = "" if self.min is None else ("(" if self.min_exclusive else "[") + f"{self.min:g}"
            hi = "" if self.max is None else f"{self.max:g}]"
            text = f"{lo or '(-inf'}, {hi or 'inf)'}"
        else:
            text = ""
        return (text + (" or none" if self.nullable else "")).strip()

    def json_schema(self) -> dict:
        item: dict[str, Any] = {"type": _JSON_TYPES[self.scalar]}
        if self.choices is not None:
            item["enum"] = list(self.choices)
        if self.min is not None:
            item["exclusiveMinimum" if self.min_exclusive else "minimum"] = self.min
        if self.max is not None:
            item["maximum"] = self.max
        schema = {"type": "array", "items": item} if self.is_list else item
        if self.nullable:
            schema = {"anyOf": [schema, {"type": "null"}]}
        default = list(self.default) if self.is_list and self.default is not None else self.default
        return {**schema, "default": default, "description": self.help, "x-source": self.source,
                "x-type": self.type}


@dataclass(frozen=True)
class Input:
    """An extra input a method takes, by role.

    ``kind`` is ``text`` or ``image``; ``default`` (text only) is used when it is not given and not ``required``.
    An ``aligned`` image has the input image's size (checked before any model loads) and is cropped, resized and
    padded exactly like it (e.g. a control image); other images keep their own size (e.g. a reference image).
    """

    role: str
    kind: str
    help: str
    required: bool = False
    default: str | None = None
    aligned: bool = False
    source: str = ""

    def __post_init__(self) -> None:
        if not self.role.isidentifier():
            raise ValueError(f"input role {self.role!r} must be a Python identifier")
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"input {self.role!r}: kind must be one of {INPUT_KINDS}, got {self.kind!r}")
        if self.role in STANDARD_ROLES and STANDARD_ROLES[self.role] != self.kind:
            raise ValueError(f"input {self.role!r} is a standard role of kind {STANDARD_ROLES[self.role]!r}")
        if self.kind == "image" and self.default is not None:
            raise ValueError(f"input {self.role!r}: image inputs have no default")
        if self.aligned and self.kind != "image":
            raise ValueError(f"input {self.role!r}: only image inputs can be aligned")
        if self.required and self.default is not None:
            raise ValueError(f"input {self.role!r}: a required input has no default")

    def json_schema(self) -> dict:
        schema: dict[str, Any] = {"type": "string", "description": self.help, "x-kind": self.kind,
                                  "x-aligned": self.aligned, "x-source": self.source}
        if self.kind == "image":
            schema["contentMediaType"] = "image/*"
        if self.default is not None:
            schema["default"] = self.default
        return schema


STANDARD_WEIGHTS = ("controlnet", "t2i_adapter", "ip_adapter", "lora")
"""Load-time weights front ends know by name (CLI flag ``--<name with dashes>``); others via ``--weights NAME=PATH``."""


@dataclass(frozen=True)
class Weights:
    """Extra weights a method's builder loads besides ``model``: passed as ``build(..., <name>=path or None)``."""

    name: str
    help: str
    required: bool = False
    source: str = ""

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"weights name {self.name!r} must be a Python identifier")

    def json_schema(self) -> dict:
        return {"type": "string", "description": self.help, "x-source": self.source}


@dataclass(frozen=True)
class Preset:
    """Named option values (checked against the options when the method registers)."""

    name: str
    values: Mapping[str, Any]
    help: str
    source: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """Everything a method declares besides its builder: options, presets and extra inputs."""

    options: tuple[Option, ...] = ()
    inputs: tuple[Input, ...] = ()
    presets: tuple[Preset, ...] = ()
    weights: tuple[Weights, ...] = ()
    by_name: dict[str, Option] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("options", "inputs", "presets", "weights"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "by_name", {o.name: o for o in self.options})
        weights = [w.name for w in self.weights]
        if len(set(weights)) != len(weights) or {"model", "device", "dtype", "vae"} & set(weights):
            raise ValueError(f"weights names must be unique and not model/device/dtype/vae: {weights}")
        names = [o.name for o in self.options] + [i.role for i in self.inputs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"option/input names declared twice: {duplicates}")
        reserved = {"image", "mask", "generator", "progress_bar"} & set(names)
        if reserved:
            raise ValueError(f"option/input names {sorted(reserved)} are reserved by the runner contract")
        presets = [p.name for p in self.presets]
        if len(set(presets)) != len(presets):
            raise ValueError(f"preset names declared twice: {presets}")
        for preset in self.presets:
            try:
                self._check_values(preset.values)
            except InputError as err:
                raise ValueError(f"preset {preset.name!r}: {err}") from None

    # ----------------------------------------------------------------------------------------- values
    def defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}

    def preset(self, name: str) -> Preset:
        for preset in self.presets:
            if preset.name == name:
                return preset
        choices = ", ".join(p.name for p in self.presets) or "none (this method has no presets)"
        raise InputError(f"unknown preset {name!r}; choose one of: {choices}", "preset")

    def _option(self, name: str) -> Option:
        if name not in self.by_name:
            raise InputError(f"unknown option {name!r}; valid options: {', '.join(self.by_name) or 'none'}",
                             f"options.{name}")
        return self.by_name[name]

    def _check_values(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return {name: self._option(name).check(value) for name, value in values.items()}

    def resolve(self, preset: str | None = None, values: Mapping[str, Any] | None = None,
                strings: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Every option's value: defaults < ``preset`` < ``values`` (Python values) < ``strings`` (command-line
        text, parsed by type). Unknown names and bad values are :class:`InputError`\\ s."""
        resolved = self.defaults()
        if preset is not None:
            resolved.update(self._check_values(self.preset(preset).values))
        resolved.update(self._check_values(values or {}))
        resolved.update({name: self._option(name).parse(text) for name, text in (strings or {}).items()})
        return resolved

    def input(self, role: str) -> Input:
        for declared in self.inputs:
            if declared.role == role:
                return declared
        raise InputError(f"this method takes no {role!r} input; it takes: "
                         f"{', '.join(i.role for i in self.inputs) or 'none'}", f"inputs.{role}")

    def resolve_weights(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """Every declared weight reference (``None`` when not given); unknown names and missing required ones are
        :class:`InputError`\\ s (field ``weights.<name>``)."""
        declared = {w.name: w for w in self.weights}
        for name in given or {}:
            if name not in declared:
                raise InputError(f"this method loads no {name!r} weights; it takes: {', '.join(declared) or 'none'}",
                                 f"weights.{name}")
        result = {name: (given or {}).get(name) for name in declared}
        for name, value in result.items():
            if value is None and declared[name].required:
                raise InputError(f"this method needs {name} weights ({declared[name].help})", f"weights.{name}")
        return result

    # ------------------------------------------------------------------------------------ description
    def schema(self, name: str, description: str = "") -> dict:
        """A JSON Schema (draft 2020-12) of one request for this method: ``{"options": {...}, "inputs": {...},
        "preset": NAME}``; presets, sources and kinds ride along as ``x-`` keywords."""
        options = {"type": "object", "properties": {o.name: o.json_schema() for o in self.options},
                   "additionalProperties": False}
        inputs = {"type": "object", "properties": {i.role: i.json_schema() for i in self.inputs},
                  "required": [i.role for i in self.inputs if i.required], "additionalProperties": False}
        weights = {"type": "object", "properties": {w.name: w.json_schema() for w in self.weights},
                   "required": [w.name for w in self.weights if w.required], "additionalProperties": False}
        properties: dict[str, Any] = {"options": options, "inputs": inputs, "weights": weights}
        properties["preset"] = {"enum": [p.name for p in self.presets]} if self.presets else {"not": {}}
        return {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": name, "description": description, "type": "object", "properties": properties,
            "required": [k for k, v in (("inputs", inputs), ("weights", weights)) if v["required"]],
            "additionalProperties": False,
            "x-presets": {p.name: {"values": {k: list(v) if isinstance(v, tuple) else v for k, v in p.values.items()},
                                   "help": p.help, "source": p.source} for p in self.presets},
        }

    def markdown(self) -> str:
        """Markdown tables of the options, presets and inputs (the README's method tables are these)."""
        rows = ["| option | type | default | allowed | help | source |", "|---|---|---|---|---|---|"]
        for o in self.options:
            rows.append(f"| `{o.name}` | {o.type} | `{_cell(_show(o.default))}` | {_cell(o.allowed())} | "
                        f"{_cell(o.help)} | {_cell(o.source)} |")
        if self.presets:
            rows += ["", "| preset | values | help | source |", "|---|---|---|---|"]
            for p in self.presets:
                values = ", ".join(f"`{k}={_show(v)}`" for k, v in p.values.items())
                rows.append(f"| `{p.name}` | {values} | {p.help} | {p.source} |")
        if self.weights:
            rows += ["", "| weights | required | help | source |", "|---|---|---|---|"]
            for w in self.weights:
                rows.append(f"| `{w.name}` | {'yes' if w.required else 'no'} | {w.help} | {w.source} |")
        if self.inputs:
            rows += ["", "| input | kind | required | help |", "|---|---|---|---|"]
            for i in self.inputs:
                kind = i.kind + (", same size as the image" if i.aligned else "")
                default = f" (default `{_show(i.default)}`)" if i.default is not None else ""
                rows.append(f"| `{i.role}` | {kind} | {'yes' if i.required else 'no'} | {i.help}{default} |")
        return "\n".join(rows) + "\n"

    def text(self) -> str:
        """Plain-text tables for ``--describe``."""
        lines = []
        if self.options:
            lines.append(_columns(["option", "type", "default", "allowed", "help (source)"],
                                  [[o.name, o.type, _show(o.default), o.allowed(),
                                    o.help + (f" ({o.source})" if o.source else "")] for o in self.options]))
        else:
            lines.append("options: none")
        if self.presets:
            lines.append(_columns(["preset", "values", "help"], [
                [p.name, " ".join(f"{k}={_show(v)}" for k, v in p.values.items()), p.help] for p in self.presets]))
        lines.append(_columns(["input", "kind", "required", "help"], [
            [i.role, i.kind + (" (aligned)" if i.aligned else ""), "yes" if i.required else "no", i.help]
            for i in self.inputs]) if self.inputs else "inputs: image and mask only")
        if self.weights:
            lines.append(_columns(["weights", "required", "help"],
                                  [[w.name, "yes" if w.required else "no", w.help] for w in self.weights]))
        return "\n\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Markdown table cell text (pipes escaped)."""
    return text.replace("|", "\\|")


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(map(_show, value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _columns(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    return "\n".join(fmt.format(*r).rstrip() for r in [header, ["-" * w for w in widths], *rows])


__all__ = ["OPTION_TYPES", "INPUT_KINDS", "STANDARD_ROLES", "STANDARD_WEIGHTS", "Option", "Input", "Weights", "Preset",
           "MethodSpec"]
