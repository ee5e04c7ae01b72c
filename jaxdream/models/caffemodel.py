"""Read Caffe ``.caffemodel`` files (binary protobuf ``NetParameter``) into numpy arrays, with
neither Caffe nor the ``protobuf`` package, and nothing from the file ever run.

A ``.caffemodel`` is one protobuf message. Only a few of its fields matter for weights, so they
are decoded by hand from the wire format (varints, fixed 32/64-bit values and length-delimited
fields), which keeps the reader small, dependency-free and, above all, bounded:

* the file is read whole, up to :data:`MAX_FILE_BYTES`; every length a field declares is
  checked against what is left of its enclosing message *before* anything is sliced or
  allocated, so a lying length cannot make the reader allocate more than the file holds;
* nesting is fixed by the schema (net -> layer -> blob -> shape), so there is no recursion a
  file could deepen;
* a blob's declared shape must account for exactly the floats it carries.

Field numbers, from Caffe's ``src/caffe/proto/caffe.proto``:

* ``NetParameter``: 1 ``name``; 2 ``layers`` (``V1LayerParameter``, files written before
  2015, such as ``bvlc_googlenet.caffemodel``); 100 ``layer`` (``LayerParameter``, later files);
* ``LayerParameter``: 1 ``name``, 2 ``type`` (string), 7 ``blobs``;
* ``V1LayerParameter``: 4 ``name``, 5 ``type`` (enum), 6 ``blobs``; 1 is the V0 layer of
  pre-2014 files, which is refused (Caffe's ``upgrade_net_proto_binary`` converts them);
* ``BlobProto``: 1-4 the legacy ``num``/``channels``/``height``/``width``, 5 ``data`` (float,
  packed or not), 6 ``diff`` (training gradients: skipped), 7 ``shape`` (``BlobShape``: 1
  ``dim``, int64, packed or not), 8 ``double_data``, 9 ``double_diff`` (skipped).

Every failure surfaces as one :class:`~jaxdream.errors.CheckpointError` line naming the file.
"""

from __future__ import annotations

import array
import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
from typing import Final, Union

import numpy as np

from jaxdream.errors import CheckpointError

__all__ = ["Blob", "Layer", "MAX_FILE_BYTES", "is_torch_file", "parse_net", "read_caffemodel",
           "state_dict"]

#: Larger than any published Caffe ImageNet model (VGG-16's is 528 MiB); a bigger file is
#: refused before it is read.
MAX_FILE_BYTES: Final = 2**31
#: A blob never has more dimensions than this (Caffe's own limit is 32).
_MAX_DIMS: Final = 32
_MAX_VARINT_BYTES: Final = 10

# Wire types.
_VARINT, _FIXED64, _LENGTH, _START_GROUP, _END_GROUP, _FIXED32 = 0, 1, 2, 3, 4, 5


class _Reject(Exception):
    """Internal: the bytes are malformed; the public function adds the file name once."""


@dataclasses.dataclass(frozen=True)
class Blob:
    """One parameter blob: its values already in the shape the file declares."""

    array: np.ndarray
    #: True when the shape came from the legacy num/channels/height/width fields, which pad
    #: every blob to four dimensions (a bias of 64 is (1, 1, 1, 64)).
    legacy_shape: bool


@dataclasses.dataclass(frozen=True)
class Layer:
    name: str
    type: str
    blobs: tuple[Blob, ...]


# ------------------------------------------------------------------------------ wire format


def _varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    """Decodes a base-128 varint at ``pos``; returns (value, next position)."""
    value = shift = 0
    for count in range(_MAX_VARINT_BYTES):
        if pos >= end:
            raise _Reject("is truncated (a number runs past the end of its message)")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise _Reject(f"has a number longer than {_MAX_VARINT_BYTES} bytes (corrupt)")


_Value = Union[int, tuple[int, int]]


def _fields(data: memoryview, start: int, end: int, where: str
            ) -> Iterator[tuple[int, int, _Value]]:
    """Yields (field number, wire type, value) for each field of the message in
    ``data[start:end]``: an int for varints and fixed-size values, (offset, length) for
    length-delimited ones, already checked to lie inside the message."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Reject(f"has a field numbered 0 in {where} (not protobuf, or corrupt)")
        if wire == _VARINT:
            value, pos = _varint(data, pos, end)
            yield number, wire, value
        elif wire in (_FIXED32, _FIXED64):
            size = 4 if wire == _FIXED32 else 8
            if pos + size > end:
                raise _Reject(f"is truncated inside {where}")
            yield number, wire, int.from_bytes(data[pos:pos + size], "little")
            pos += size
        elif wire == _LENGTH:
            length, pos = _varint(data, pos, end)
            if length > end - pos:
                raise _Reject(f"declares a field of {length} bytes in {where}, but only "
                              f"{end - pos} remain (truncated or corrupt)")
            yield number, wire, (pos, length)
            pos += length
        else:
            kind = "group" if wire in (_START_GROUP, _END_GROUP) else f"wire type {wire}"
            raise _Reject(f"has a {kind} field in {where}, which Caffe never writes (corrupt)")


def _text(data: memoryview, span: tuple[int, int], what: str) -> str:
    start, length = span
    try:
        return bytes(data[start:start + length]).decode("utf-8")
    except UnicodeDecodeError:
        raise _Reject(f"has a {what} that is not UTF-8 text (corrupt)") from None


def _expect(wire: int, wanted: tuple[int, ...], field: str) -> None:
    if wire not in wanted:
        raise _Reject(f"has field {field} with wire type {wire} (corrupt, or not a "
                      f"caffemodel)")


# ------------------------------------------------------------------------------ messages


def _packed_varints(data: memoryview, span: tuple[int, int], where: str) -> list[int]:
    start, length = span
    values, pos = [], start
    while pos < start + length:
        value, pos = _varint(data, pos, start + length)
        values.append(value)
    return values


def _shape(data: memoryview, span: tuple[int, int], where: str) -> list[int]:
    dims: list[int] = []
    for number, wire, value in _fields(data, span[0], span[0] + span[1], where):
        if number != 1:
            continue
        _expect(wire, (_VARINT, _LENGTH), f"BlobShape.dim in {where}")
        dims.extend(_packed_varints(data, value, where) if wire == _LENGTH else [value])
        if len(dims) > _MAX_DIMS:
            raise _Reject(f"has a blob with more than {_MAX_DIMS} dimensions in {where}")
    # int64 on the wire: a negative dimension arrives as a huge unsigned value.
    if any(d >= 2**63 for d in dims):
        raise _Reject(f"has a negative blob dimension in {where}")
    return dims


def _blob(data: memoryview, span: tuple[int, int], where: str) -> Blob:
    legacy: dict[int, int] = {}
    dims: list[int] | None = None
    chunks: list[np.ndarray] = []
    # Unpacked floats arrive one field each; an array('I') holds them in 4 bytes apiece, so
    # memory stays below the file's own size however the file is written.
    singles = array.array("I")
    doubles: list[np.ndarray] = []
    for number, wire, value in _fields(data, span[0], span[0] + span[1], where):
        if number in (1, 2, 3, 4):
            _expect(wire, (_VARINT,), f"BlobProto legacy dimension in {where}")
            legacy[number] = value
        elif number == 5:  # float data: packed (one length-delimited run) or one per field
            _expect(wire, (_LENGTH, _FIXED32), f"BlobProto.data in {where}")
            if wire == _FIXED32:
                singles.append(value)
            else:
                start, length = value
                if length % 4:
                    raise _Reject(f"has float data of {length} bytes (not a multiple of 4) "
                                  f"in {where}")
                chunks.append(np.frombuffer(data[start:start + length], "<f4"))
        elif number == 8:  # double data
            _expect(wire, (_LENGTH, _FIXED64), f"BlobProto.double_data in {where}")
            if wire == _FIXED64:
                doubles.append(np.asarray([value], np.uint64).view("<f8"))
            else:
                start, length = value
                if length % 8:
                    raise _Reject(f"has double data of {length} bytes (not a multiple of 8) "
                                  f"in {where}")
                doubles.append(np.frombuffer(data[start:start + length], "<f8"))
        elif number == 7:
            _expect(wire, (_LENGTH,), f"BlobProto.shape in {where}")
            dims = _shape(data, value, where)
        # 6 and 9 (diffs) and anything unknown: skipped, already bounds-checked.
    if singles:
        chunks.append(np.frombuffer(singles, np.uint32).astype("<u4").view("<f4"))
    if chunks and doubles:
        raise _Reject(f"has a blob with both float and double data in {where}")
    parts = doubles or chunks
    values = np.concatenate(parts) if len(parts) > 1 else (
        parts[0] if parts else np.zeros((0,), np.float32))
    from_legacy = dims is None
    if dims is None:
        if not legacy:
            raise _Reject(f"has a blob with no shape in {where}")
        if any(v >= 2**31 for v in legacy.values()):
            raise _Reject(f"has a negative legacy blob dimension in {where}")
        # Caffe's defaults: a missing legacy dimension is 0 (see BlobProto in caffe.proto).
        dims = [legacy.get(i, 0) for i in (1, 2, 3, 4)]
    expected = math.prod(dims)
    if expected != values.size:
        raise _Reject(f"has a blob in {where} whose shape {tuple(dims)} needs {expected} values "
                      f"but which carries {values.size}")
    # A copy in native byte order: frombuffer views point into the file's bytes, and the
    # result must own its data.
    values = values.astype(values.dtype.newbyteorder("="), copy=True)
    return Blob(values.reshape(dims), from_legacy)


def _layer(data: memoryview, span: tuple[int, int], index: int, v1: bool) -> Layer:
    name_field, type_field, blob_field = (4, 5, 6) if v1 else (1, 2, 7)
    where = f"{'V1 layers' if v1 else 'layer'}[{index}]"
    name, kind = None, ""
    blob_spans: list[tuple[int, int]] = []
    for number, wire, value in _fields(data, span[0], span[0] + span[1], where):
        if number == name_field:
            _expect(wire, (_LENGTH,), f"name of {where}")
            name = _text(data, value, f"layer name in {where}")
        elif number == type_field:
            if v1:  # an enum (V1LayerType); the number is kept only for messages
                _expect(wire, (_VARINT,), f"type of {where}")
                kind = f"V1 type {value}"
            else:
                _expect(wire, (_LENGTH,), f"type of {where}")
                kind = _text(data, value, f"layer type in {where}")
        elif number == blob_field:
            _expect(wire, (_LENGTH,), f"blobs of {where}")
            blob_spans.append(value)
        elif v1 and number == 1:
            raise _Reject("uses Caffe's V0 layer format (before 2014); convert it with Caffe's "
                          "upgrade_net_proto_binary first")
    if name is None:
        raise _Reject(f"has a layer without a name ({where})")
    where = f"layer {name!r}"
    blobs = tuple(_blob(data, blob_span, f"{where}, blob {i}")
                  for i, blob_span in enumerate(blob_spans))
    return Layer(name, kind, blobs)


def parse_net(data: bytes | memoryview) -> list[Layer]:
    """Decodes a ``NetParameter`` message: its layers, in file order, V1 and current alike.

    Raises ``_Reject`` (internal) on malformed input; use :func:`read_caffemodel` for files.
    """
    view = memoryview(data).cast("B")
    layers: list[Layer] = []
    v1_count = current_count = 0
    for number, wire, value in _fields(view, 0, len(view), "the net"):
        if number == 2:
            _expect(wire, (_LENGTH,), "NetParameter.layers")
            layers.append(_layer(view, value, v1_count, v1=True))
            v1_count += 1
        elif number == 100:
            _expect(wire, (_LENGTH,), "NetParameter.layer")
            layers.append(_layer(view, value, current_count, v1=False))
            current_count += 1
    if not layers:
        raise _Reject("holds no layers: not a caffemodel (a deploy.prototxt is text; the "
                      "weights are the binary .caffemodel)")
    seen: set[str] = set()
    for layer in layers:
        if layer.name in seen and layer.blobs:
            raise _Reject(f"has two layers named {layer.name!r} with weights")
        seen.add(layer.name)
    return layers


def is_torch_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` starts like a ``torch.save`` file (a zip archive or a pickle) rather
    than a caffemodel, which starts with a protobuf field.

    Raises:
        CheckpointError: the file cannot be opened, or is not a regular file (a FIFO would
            block).
    """
    from jaxdream.models.checkpoint import _open_regular_file, _Reject as _NotRegular

    try:
        with _open_regular_file(path) as file:
            head = file.read(4)
    except _NotRegular as exc:
        raise CheckpointError(f"weights file {os.fspath(path)}: {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"weights file {os.fspath(path)}: cannot be read: "
                              f"{exc.strerror or exc}") from exc
    return head.startswith((b"PK\x03\x04", b"\x80"))


def read_caffemodel(path: str | os.PathLike[str]) -> list[Layer]:
    """The layers of a ``.caffemodel`` file with their weight blobs, as numpy arrays.

    Raises:
        CheckpointError: the file cannot be read, is larger than :data:`MAX_FILE_BYTES`, is
            truncated, or is not a well-formed caffemodel; one line naming the file.
    """
    from jaxdream.models.checkpoint import _open_regular_file, _Reject as _NotRegular

    shown = os.fspath(path)
    try:
        with _open_regular_file(path) as file:
            size = os.fstat(file.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise _Reject(f"is {size} bytes, larger than the {MAX_FILE_BYTES}-byte limit")
            data = file.read(MAX_FILE_BYTES + 1)
        if not data:
            raise _Reject("is empty")
        return parse_net(data)
    except (_Reject, _NotRegular) as exc:
        raise CheckpointError(f"caffemodel {shown}: {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"caffemodel {shown}: cannot be read: {exc.strerror or exc}"
                              ) from exc


def state_dict(layers: list[Layer], ranks: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Caffe layers as a flat state dict: ``{layer}.weight`` and ``{layer}.bias`` for layers
    with two blobs (convolutions, inner products), ``{layer}.weight`` for one, and
    ``{layer}.blob{i}`` otherwise, so the strict converter can list whatever does not fit.

    ``ranks`` gives the rank a key is expected to have: a blob whose shape came from the
    legacy four fields (a bias of 64 stored as (1, 1, 1, 64)) is reshaped to that rank when
    only leading ones are dropped, as Caffe itself accepts; anything else is left as it is.
    """
    result: dict[str, np.ndarray] = {}
    for layer in layers:
        if not layer.blobs:
            continue
        suffixes = (("weight", "bias") if len(layer.blobs) == 2 else ("weight",)
                    if len(layer.blobs) == 1 else
                    tuple(f"blob{i}" for i in range(len(layer.blobs))))
        for suffix, blob in zip(suffixes, layer.blobs, strict=True):
            key = f"{layer.name}.{suffix}"
            array = blob.array
            rank = ranks.get(key)
            if (blob.legacy_shape and rank is not None and array.ndim > rank
                    and all(d == 1 for d in array.shape[:array.ndim - rank])):
                array = array.reshape(array.shape[array.ndim - rank:])
            result[key] = array
    return result
