"""Read CTranslate2's ``model.bin`` into named torch tensors, without the ctranslate2 package.

The format, as CTranslate2 writes it (``specs/model_spec.py``) and reads it (``src/models/model.cc``);
all integers little-endian, strings as ``uint16 length`` (counting a closing NUL) + bytes + NUL::

    uint32 binary_version                      (1..6)
    string spec_name, uint32 spec_revision     (binary_version >= 2)
    uint32 num_variables, then per variable:
        string name, uint8 rank, uint32 dims[rank]
        uint8 dtype_id, uint32 num_bytes       (binary_version >= 4; dtype ids below)
        uint8 item_size, uint32 num_items      (binary_version < 4: 4 float32, 2 int16, 1 int8)
        num_bytes raw bytes, row-major
    uint32 num_aliases, then (string alias, string target) pairs   (binary_version >= 3)

Quantized weights (int8 / int16) come with a ``<name>_scale`` variable; `dequantize` turns them back
into floats the way CTranslate2 does (``value / scale``, per output row for int8).

Some packages ship ``model.bin`` split into parts (for upload size limits); the parts are read as one
stream, in the order given.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

MAX_BINARY_VERSION = 6
# Order of CTranslate2's DataType enum (include/ctranslate2/types.h).
CT2_DTYPES: dict[int, torch.dtype] = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32,
                                      4: torch.float16, 5: torch.bfloat16}
_LEGACY_ITEM_DTYPES = {4: torch.float32, 2: torch.int16, 1: torch.int8}
# A model.bin starts with a small binary version; anything else is not one (e.g. a safetensors file).
_NOT_CT2_HINT = ("expected a CTranslate2 model.bin (it starts with a uint32 binary version 1.."
                 f"{MAX_BINARY_VERSION})")


class CT2FormatError(ValueError):
    """A file that is not a readable CTranslate2 model; the message names the file and what was expected."""


@dataclass
class CT2Model:
    """The contents of a ``model.bin``: its spec, and its variables with aliases resolved."""

    source: str
    binary_version: int
    spec_name: str
    spec_revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str] = field(default_factory=dict)


def read_ct2_model(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> CT2Model:
    """Read ``model.bin`` (or its parts, concatenated in the given order) into a `CT2Model`.

    Aliased variables (CTranslate2 stores a tied weight once) map to the same tensor under both names.
    """
    files = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if not files:
        raise CT2FormatError("no CTranslate2 model files given; expected model.bin or its parts")
    stream = _PartsStream(files)
    try:
        return _read(stream)
    finally:
        stream.close()


def dequantize(model: CT2Model) -> dict[str, torch.Tensor]:
    """Variables with int8/int16 weights turned back into float32 and their ``*_scale`` entries dropped."""
    variables = dict(model.variables)
    for name in [n for n in variables if n.endswith("_scale")]:
        base = name.removesuffix("_scale")
        if base not in variables or variables[base].dtype not in (torch.int8, torch.int16):
            continue
        value, scale = variables[base], variables.pop(name).float()
        if name.endswith("weight_zero") or base + "_zero" in variables:
            raise CT2FormatError(f"{model.source}: {base} is AWQ-quantized (has a zero point); only CTranslate2's "
                                 f"own int8/int16 quantization can be converted")
        if scale.ndim == 1 and scale.shape[0] == value.shape[0]:
            scale = scale.view(-1, *[1] * (value.ndim - 1))  # one scale per output row
        elif scale.numel() != 1:
            raise CT2FormatError(f"{model.source}: {name} has shape {list(scale.shape)}; expected a scalar or one "
                                 f"scale per row of {base} ({value.shape[0]})")
        variables[base] = value.float() / scale
    # Aliases were resolved to the quantized tensors; point them at the dequantized ones.
    for alias, target in model.aliases.items():
        if target in variables:
            variables[alias] = variables[target]
        variables.pop(alias + "_scale", None)
    return variables


class _PartsStream:
    """Exact reads across one or more files, with errors naming the files and the byte offset."""

    def __init__(self, files: list[Path]) -> None:
        for path in files:
            if not path.is_file():
                raise CT2FormatError(f"{path}: no such file; expected a CTranslate2 model.bin"
                                     + (" part" if len(files) > 1 else ""))
        self.files = files
        self.label = str(files[0]) if len(files) == 1 else " + ".join(map(str, files)) + " (concatenated)"
        self.total = sum(path.stat().st_size for path in files)
        self.offset = 0
        self._index = 0
        self._handle = open(files[0], "rb")  # noqa: SIM115 (closed in close())

    def read(self, size: int, what: str) -> bytes:
        chunks, wanted, start = [], size, self.offset
        while wanted:
            chunk = self._handle.read(wanted)
            if chunk:
                chunks.append(chunk)
                wanted -= len(chunk)
                continue
            if self._index + 1 == len(self.files):
                hint = "are parts missing?" if len(self.files) > 1 else "is it one part of a split model.bin?"
                raise CT2FormatError(f"{self.label}: truncated: {what} at byte {start} needs {size} bytes but the "
                                     f"data ends at byte {self.total} ({hint} re-install or re-download it)")
            self._handle.close()
            self._index += 1
            self._handle = open(self.files[self._index], "rb")  # noqa: SIM115
        self.offset += size
        return b"".join(chunks)

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt), what))

    def string(self, what: str) -> str:
        (length,) = self.unpack("H", f"length of {what}")
        raw = self.read(length, what)
        try:
            return raw.split(b"\0", 1)[0].decode("utf-8")
        except UnicodeDecodeError as error:
            raise CT2FormatError(f"{self.label}: {what} at byte {self.offset - length} is not UTF-8 text; "
                                 f"{_NOT_CT2_HINT}") from error

    def close(self) -> None:
        self._handle.close()


def _read(stream: _PartsStream) -> CT2Model:
    (version,) = stream.unpack("I", "binary version")
    if not 1 <= version <= MAX_BINARY_VERSION:
        raise CT2FormatError(f"{stream.label}: binary version {version} (bytes 0-3); {_NOT_CT2_HINT}")
    spec_name, revision = "", 1
    if version >= 2:
        spec_name = stream.string("spec name")
        (revision,) = stream.unpack("I", "spec revision")
    (count,) = stream.unpack("I", "variable count")
    variables: dict[str, torch.Tensor] = {}
    for index in range(count):
        name = stream.string(f"name of variable {index}")
        (rank,) = stream.unpack("B", f"rank of {name}")
        shape = list(stream.unpack(f"{rank}I", f"shape of {name}")) if rank else []
        if version >= 4:
            dtype_id, num_bytes = stream.unpack("BI", f"dtype of {name}")
            if dtype_id not in CT2_DTYPES:
                raise CT2FormatError(f"{stream.label}: variable {name} has dtype id {dtype_id}; expected one of "
                                     f"{ {k: str(v).removeprefix('torch.') for k, v in CT2_DTYPES.items()} }")
            dtype = CT2_DTYPES[dtype_id]
        else:
            item_size, num_items = stream.unpack("BI", f"item size of {name}")
            if item_size not in _LEGACY_ITEM_DTYPES:
                raise CT2FormatError(f"{stream.label}: variable {name} has item size {item_size}; expected 1, 2 "
                                     f"or 4 bytes")
            dtype, num_bytes = _LEGACY_ITEM_DTYPES[item_size], num_items * item_size
        expected = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        if num_bytes != expected:
            raise CT2FormatError(f"{stream.label}: variable {name} of shape {shape} and dtype "
                                 f"{str(dtype).removeprefix('torch.')} declares {num_bytes} bytes; expected {expected}")
        # bytearray: writable, so torch.frombuffer does not warn, and the tensor owns its own storage.
        data = bytearray(stream.read(num_bytes, f"data of {name}"))
        variables[name] = torch.frombuffer(data, dtype=dtype).reshape(shape) if num_bytes else torch.empty(
            shape, dtype=dtype)
    aliases: dict[str, str] = {}
    if version >= 3:
        (num_aliases,) = stream.unpack("I", "alias count")
        for index in range(num_aliases):
            alias = stream.string(f"alias {index}")
            aliases[alias] = stream.string(f"target of alias {alias}")
    if stream.offset != stream.total:
        raise CT2FormatError(f"{stream.label}: {stream.total - stream.offset} unexpected bytes after the model "
                             f"(which ends at byte {stream.offset}); are parts missing, repeated or out of order?")
    for alias, target in aliases.items():
        if target not in variables:
            raise CT2FormatError(f"{stream.label}: alias {alias} points to {target}, which is not a variable")
        variables[alias] = variables[target]
    return CT2Model(stream.label, version, spec_name, revision, variables, aliases)


def _numel(shape: list[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total
