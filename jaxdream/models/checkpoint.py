# long: the restricted unpickler and both formats stay together: one reading shows every check
"""Read PyTorch checkpoint files into numpy arrays, with no PyTorch and no code run from the file.

Pretrained weights come as ``torch.save`` files downloaded from the internet, and a ``torch.save``
file is a pickle: loading it with ``pickle`` (or an old ``torch.load``) runs whatever callable the
file names. So this reader never lets the file pick a callable. Every global the pickle asks for
is looked up in a short allow-list of harmless stand-ins defined here, and anything else is
refused before it is touched. The stand-ins only *describe* tensors (storage, offset, shape,
strides); the raw bytes are read afterwards, bounds-checked against what the file really holds,
and copied into fresh numpy arrays. Before the C unpickler sees a pickle, a pure-Python scan
checks that every length it declares is really present and every memo slot is plausible, so a
hostile file cannot make it allocate gigabytes either.

Both layouts ``torch.save`` writes are understood:

* legacy (``_use_new_zipfile_serialization=False``; the default before torch 1.6): five pickles in
  a row (magic number, protocol version, sys info, the object, the list of storage keys), then for
  each key in that list an 8-byte little-endian element count and the raw little-endian bytes;
* zip (the default since torch 1.6, used by torchvision's downloads): one top-level folder of any
  name holding ``data.pkl``, an optional ``byteorder`` record and one ``data/<key>`` record per
  storage.

The oldest (tar) layout and TorchScript archives are refused with a message that says so.

Every failure, including a corrupt, truncated or hostile file, surfaces as
:class:`~jaxdream.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
import os
import pickle
import pickletools
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import BinaryIO, Final, NoReturn

import ml_dtypes
import numpy as np

from jaxdream.errors import CheckpointError
from jaxdream.files import Refused, open_regular_file

__all__ = ["TensorShapes", "load_state_dict", "sha256_file"]

#: What ``load_state_dict(path, check=...)`` hands its check: each tensor's name, shape and
#: dtype, known from the pickle alone, before a single byte of tensor data is read or inflated.
TensorShapes = Mapping[str, tuple[tuple[int, ...], np.dtype]]

_MAGIC_NUMBER: Final = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION: Final = 1001

# Keys under which training scripts commonly nest the state dict next to epoch counters,
# optimizer state and the like. Order is irrelevant: more than one match is refused as ambiguous.
_WRAPPER_KEYS: Final = ("state_dict", "model_state_dict", "model", "module", "net", "weights")

# Output may legitimately exceed the stored bytes (tied weights listed twice, stride-0 expanded
# tensors), but a few bytes of storage must not become gigabytes of output.
_EXPANSION_FACTOR: Final = 4
_EXPANSION_SLACK_BYTES: Final = 64 * 2**20
# zlib cannot inflate more than about 1032:1; an entry claiming more is lying about its size.
_MAX_DEFLATE_RATIO: Final = 1100
_MAX_PICKLE_BYTES: Final = 2**30
# torch.save never compresses a zip entry; a re-zipped checkpoint may. A compressed entry is the
# one place a small file can ask for far more memory than it occupies, so compressed data is
# bounded twice: by what the tensors described in the pickle (the model's, once ``check`` has
# matched them) can hold, and by a ratio no real weights reach (random floats barely compress:
# about 1.1:1), so even an unchecked load of a 10 MB file never inflates more than ~160 MB.
_MAX_COMPRESSED_PICKLE_BYTES: Final = 64 * 2**20
_MAX_INFLATE_RATIO: Final = 16
_INFLATE_SLACK_BYTES: Final = 2**20
_MAX_NDIM: Final = 64
_MAX_ELEMENTS: Final = 2**62
# Text opcodes (GLOBAL module/name lines) never need long lines; without a cap a newline-free
# garbage file would be read whole by readline().
_READLINE_LIMIT: Final = 2**16

_HASH_CHUNK_BYTES: Final = 2**20

# Exceptions that the stdlib parsers (pickle, zipfile, zlib, struct) raise on
# malformed input, or that a hostile pickle provokes by combining allowed objects wrongly (e.g.
# REDUCE on an int gives TypeError, BUILD on a dict AttributeError). They mean "bad file".
_MALFORMED_INPUT_ERRORS: Final = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    RecursionError,
    NotImplementedError,
    struct.error,
    zipfile.BadZipFile,
    zlib.error,
)


class _Reject(Exception):
    """Internal: the file is bad or hostile; the message is completed with the path at the API edge.

    Kept separate from CheckpointError so stand-ins, which do not know the path, can raise it from
    inside the unpickler and the public functions add the file name exactly once.
    """


def _quote(text: object, limit: int = 120) -> str:
    """Quote a file-supplied string for an error message, escaped and bounded in length."""
    if type(text) is not str:
        return _describe(text)
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def _kind(value: object) -> str:
    """'a list', 'an int', 'a tensor': a file-supplied value's type, never its (maybe huge) repr."""
    if value is None:
        return "None"
    name = _STAND_IN_NAMES.get(type(value), type(value).__name__)
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _describe(value: object) -> str:
    """Show small integers themselves (a negative stride says more than 'an int')."""
    if type(value) is int and abs(value) < 10**30:
        return str(value)
    return _kind(value)


# --------------------------------------------------------------------------------------------
# Stand-ins handed to the pickle instead of torch objects
# --------------------------------------------------------------------------------------------


class _Inert:
    """Base for every object the unpickler may put on the pickle's stack.

    No instance ``__dict__`` and a refusing ``__setstate__`` mean a hostile BUILD opcode cannot
    alter a stand-in, which matters because the allow-listed ones are shared module singletons.
    """

    __slots__ = ()

    def __setstate__(self, state: object) -> NoReturn:
        raise _Reject(
            f"the pickle tries to set the state of {_kind(self)} (BUILD), "
            "which a state dict never does"
        )


class _StorageType(_Inert):
    """Stands in for ``torch.FloatStorage`` and friends: only its element type matters."""

    __slots__ = ("qualname", "dtype", "untyped")

    def __init__(self, qualname: str, dtype: np.dtype, *, untyped: bool = False) -> None:
        self.qualname = qualname
        self.dtype = dtype
        self.untyped = untyped


class _DType(_Inert):
    """Stands in for a ``torch.<dtype>`` global, which ``_rebuild_tensor_v3`` takes separately."""

    __slots__ = ("qualname", "dtype")

    def __init__(self, qualname: str, dtype: np.dtype) -> None:
        self.qualname = qualname
        self.dtype = dtype


class _StorageRef(_Inert):
    """A storage the pickle declared; its bytes are fetched only if a returned tensor uses it.

    ``key`` names the root storage in the file; ``byte_offset`` and ``numel`` describe the visible
    part (legacy files may carry views into a root storage).
    """

    __slots__ = ("key", "dtype", "untyped", "byte_offset", "numel")

    def __init__(
        self, key: str, dtype: np.dtype, untyped: bool, byte_offset: int, numel: int
    ) -> None:
        self.key = key
        self.dtype = dtype
        self.untyped = untyped
        self.byte_offset = byte_offset
        self.numel = numel

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class _TensorRef(_Inert):
    """A validated description of one tensor; materialised only once the whole file checks out."""

    __slots__ = ("storage", "offset", "shape", "strides", "dtype", "negate", "conjugate")

    def __init__(
        self,
        storage: _StorageRef,
        offset: int,
        shape: tuple[int, ...],
        strides: tuple[int, ...],
        dtype: np.dtype,
        *,
        negate: bool,
        conjugate: bool,
    ) -> None:
        self.storage = storage
        self.offset = offset
        self.shape = shape
        self.strides = strides
        self.dtype = dtype
        self.negate = negate
        self.conjugate = conjugate

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class _Callable(_Inert):
    """Stands in for an allow-listed torch function; calls go to a local, side-effect-free twin."""

    __slots__ = ("qualname", "_impl")

    def __init__(self, qualname: str, impl: Callable[..., object]) -> None:
        self.qualname = qualname
        self._impl = impl

    def __call__(self, *args: object) -> object:
        return self._impl(self.qualname, args)


def _arity(qualname: str, args: tuple[object, ...], *counts: int) -> None:
    if len(args) not in counts:
        expected = " or ".join(str(c) for c in counts)
        raise _Reject(f"{qualname} is called with {len(args)} arguments, expected {expected}")


def _count(value: object, what: str) -> int:
    """An element count or offset: a non-negative int, bounded so later products stay sane."""
    if type(value) is not int or value < 0:
        raise _Reject(f"{what} must be a non-negative integer, got {_describe(value)}")
    if value > _MAX_ELEMENTS:
        raise _Reject(f"{what} is implausibly large (over 2**62)")
    return value


def _counts(value: object, what: str) -> tuple[int, ...]:
    if type(value) not in (tuple, list):
        raise _Reject(f"tensor {what} must be a tuple of integers, got {_kind(value)}")
    if len(value) > _MAX_NDIM:
        raise _Reject(f"tensor {what} has {len(value)} dimensions, more than {_MAX_NDIM}")
    return tuple(_count(item, f"every tensor {what} entry") for item in value)  # type: ignore


def _make_tensor(
    storage: object,
    offset: object,
    size: object,
    stride: object,
    dtype: np.dtype,
    metadata: object = None,
) -> _TensorRef:
    """Validate a tensor description against its storage, so that reading it later is safe."""
    if not isinstance(storage, _StorageRef):
        raise _Reject(f"a tensor's storage is {_kind(storage)}, not a storage from this file")
    start = _count(offset, "a tensor's storage offset")
    shape = _counts(size, "size")
    strides = _counts(stride, "stride")
    if len(shape) != len(strides):
        raise _Reject(f"a tensor has {len(shape)} sizes but {len(strides)} strides")
    negate = conjugate = False
    if metadata is not None:
        if type(metadata) is not dict or not set(metadata) <= {"neg", "conj"}:
            raise _Reject("a tensor's metadata must be a dict with only 'neg'/'conj' flags")
        if not all(type(flag) is bool for flag in metadata.values()):
            raise _Reject("a tensor's 'neg'/'conj' metadata flags must be booleans")
        negate = metadata.get("neg", False)
        conjugate = metadata.get("conj", False)
        if negate and (dtype == np.bool_ or dtype.kind == "u"):
            raise _Reject(f"a tensor of dtype {dtype} cannot carry the negation flag")
    ref = _TensorRef(storage, start, shape, strides, dtype, negate=negate, conjugate=conjugate)
    if ref.numel:
        last = start + sum((n - 1) * s for n, s in zip(shape, strides))
        capacity = storage.nbytes // dtype.itemsize
        if last >= capacity:
            raise _Reject(
                f"a tensor of shape {shape}, strides {strides} and offset {start} reaches element "
                f"{last} of storage {_quote(storage.key)}, which holds only {capacity} elements "
                f"of {dtype}"
            )
    return ref


def _check_flags(requires_grad: object, backward_hooks: object) -> None:
    if type(requires_grad) is not bool:
        raise _Reject(f"a tensor's requires_grad is {_kind(requires_grad)}, not a bool")
    if not isinstance(backward_hooks, dict):
        raise _Reject(f"a tensor's backward hooks are {_kind(backward_hooks)}, not a dict")


def _rebuild_tensor(qualname: str, args: tuple[object, ...]) -> _TensorRef:
    _arity(qualname, args, 4)
    storage = args[0]
    if not isinstance(storage, _StorageRef):
        raise _Reject(f"a tensor's storage is {_kind(storage)}, not a storage from this file")
    return _make_tensor(storage, args[1], args[2], args[3], storage.dtype)


def _rebuild_tensor_v2(qualname: str, args: tuple[object, ...]) -> _TensorRef:
    # (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
    _arity(qualname, args, 6, 7)
    storage = args[0]
    if not isinstance(storage, _StorageRef):
        raise _Reject(f"a tensor's storage is {_kind(storage)}, not a storage from this file")
    _check_flags(args[4], args[5])
    metadata = args[6] if len(args) == 7 else None
    return _make_tensor(storage, args[1], args[2], args[3], storage.dtype, metadata)


def _rebuild_tensor_v3(qualname: str, args: tuple[object, ...]) -> _TensorRef:
    # (untyped storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype
    #  [, metadata])
    _arity(qualname, args, 7, 8)
    storage, dtype = args[0], args[6]
    if not isinstance(storage, _StorageRef):
        raise _Reject(f"a tensor's storage is {_kind(storage)}, not a storage from this file")
    if not isinstance(dtype, _DType):
        raise _Reject(f"{qualname} needs a torch dtype, got {_kind(dtype)}")
    if not storage.untyped and storage.dtype != dtype.dtype:
        raise _Reject(f"{qualname} reads a {storage.dtype} storage as {dtype.dtype}")
    _check_flags(args[4], args[5])
    metadata = args[7] if len(args) == 8 else None
    return _make_tensor(storage, args[1], args[2], args[3], dtype.dtype, metadata)


def _rebuild_parameter(qualname: str, args: tuple[object, ...]) -> _TensorRef:
    # (data, requires_grad, backward_hooks) or, _with_state, (..., state): a Parameter is just its
    # data here; Python attributes in ``state`` carry no weights and are dropped.
    _arity(qualname, args, 4 if qualname.endswith("_with_state") else 3)
    if not isinstance(args[0], _TensorRef):
        raise _Reject(f"{qualname} wraps {_kind(args[0])}, not a tensor")
    _check_flags(args[1], args[2])
    return args[0]


def _codecs_encode(qualname: str, args: tuple[object, ...]) -> bytes:
    # Pickle protocol 2 writes every ``bytes`` value as _codecs.encode(text, 'latin1').
    _arity(qualname, args, 2)
    text, encoding = args
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise _Reject(f"{qualname} is only allowed as encode(str, 'latin1'), the bytes idiom")
    return text.encode("latin-1")


def _torch_device(qualname: str, args: tuple[object, ...]) -> str:
    # Training checkpoints sometimes record the device next to the weights; keep it as text.
    _arity(qualname, args, 1, 2)
    if type(args[0]) is not str or (len(args) == 2 and type(args[1]) is not int):
        raise _Reject(f"{qualname} takes a device name and an optional index")
    return args[0] if len(args) == 1 else f"{args[0]}:{args[1]}"


# How messages name the stand-ins: in torch's terms, not this module's.
_STAND_IN_NAMES: Final[Mapping[type, str]] = MappingProxyType(
    {
        _TensorRef: "tensor",
        _StorageRef: "storage",
        _StorageType: "storage class",
        _DType: "dtype",
        _Callable: "function",
    }
)

_BFLOAT16: Final = np.dtype(ml_dtypes.bfloat16)

# Legacy typed storages: the pickle's storage type fixes the element type.
_STORAGE_DTYPES: Final[Mapping[str, np.dtype]] = MappingProxyType(
    {
        "DoubleStorage": np.dtype(np.float64),
        "FloatStorage": np.dtype(np.float32),
        "HalfStorage": np.dtype(np.float16),
        "BFloat16Storage": _BFLOAT16,
        "LongStorage": np.dtype(np.int64),
        "IntStorage": np.dtype(np.int32),
        "ShortStorage": np.dtype(np.int16),
        "CharStorage": np.dtype(np.int8),
        "ByteStorage": np.dtype(np.uint8),
        "BoolStorage": np.dtype(np.bool_),
        "ComplexFloatStorage": np.dtype(np.complex64),
        "ComplexDoubleStorage": np.dtype(np.complex128),
    }
)

# ``torch.<name>`` dtype globals, as ``_rebuild_tensor_v3`` names them (torch >= 2.3 writes the
# dtypes without a legacy storage class, e.g. uint16 and the float8 family, this way).
_TORCH_DTYPES: Final[Mapping[str, np.dtype]] = MappingProxyType(
    {
        "float64": np.dtype(np.float64),
        "float32": np.dtype(np.float32),
        "float16": np.dtype(np.float16),
        "bfloat16": _BFLOAT16,
        "int64": np.dtype(np.int64),
        "int32": np.dtype(np.int32),
        "int16": np.dtype(np.int16),
        "int8": np.dtype(np.int8),
        "uint64": np.dtype(np.uint64),
        "uint32": np.dtype(np.uint32),
        "uint16": np.dtype(np.uint16),
        "uint8": np.dtype(np.uint8),
        "bool": np.dtype(np.bool_),
        "complex64": np.dtype(np.complex64),
        "complex128": np.dtype(np.complex128),
        "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
        "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
        "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
        "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
        "float8_e8m0fnu": np.dtype(ml_dtypes.float8_e8m0fnu),
    }
)


def _allowed_globals() -> Mapping[str, object]:
    table: dict[str, object] = {
        # The state dict container itself (BUILD on it restores torch's ``_metadata``
        # attribute on the instance; we never read it). A C type: setattr on it is impossible.
        "collections.OrderedDict": collections.OrderedDict,
    }
    rebuilders: dict[str, Callable[[str, tuple[object, ...]], object]] = {
        "_rebuild_tensor": _rebuild_tensor,
        "_rebuild_tensor_v2": _rebuild_tensor_v2,
        "_rebuild_tensor_v3": _rebuild_tensor_v3,
        "_rebuild_parameter": _rebuild_parameter,
        "_rebuild_parameter_with_state": _rebuild_parameter,
    }
    for name, impl in rebuilders.items():
        table[f"torch._utils.{name}"] = _Callable(f"torch._utils.{name}", impl)
    table["torch.device"] = _Callable("torch.device", _torch_device)
    table["_codecs.encode"] = _Callable("_codecs.encode", _codecs_encode)
    for name, dtype in _STORAGE_DTYPES.items():
        table[f"torch.{name}"] = _StorageType(f"torch.{name}", dtype)
    table["torch.storage.UntypedStorage"] = _StorageType(
        "torch.storage.UntypedStorage", np.dtype(np.uint8), untyped=True
    )
    for name, dtype in _TORCH_DTYPES.items():
        table[f"torch.{name}"] = _DType(f"torch.{name}", dtype)
    return MappingProxyType(table)


_ALLOWED_GLOBALS: Final = _allowed_globals()


# --------------------------------------------------------------------------------------------
# Unpickling
# --------------------------------------------------------------------------------------------


class _Storages:
    """The storages one file's pickle declares, checked for consistency as they appear."""

    def __init__(self, *, legacy: bool) -> None:
        self.legacy = legacy
        self.declared: dict[str, tuple[_StorageType, int]] = {}

    def declare(self, pid: object) -> _StorageRef:
        if type(pid) is not tuple or not pid:
            raise _Reject(
                f"persistent id is {_kind(pid)}, not a ('storage', ...) tuple; "
                "only tensor storages may live outside the pickle"
            )
        kind = pid[0].decode("ascii") if type(pid[0]) is bytes else pid[0]
        if kind == "module":
            raise _Reject(
                "holds a pickled nn.Module (torch.save(model)), not a state dict; "
                "save model.state_dict() instead"
            )
        if kind != "storage":
            shown = _quote(kind) if type(kind) is str else f"that is {_kind(kind)}"
            raise _Reject(f"persistent id {shown} is not a tensor storage")
        expected = 6 if self.legacy else 5
        if len(pid) != expected:
            raise _Reject(f"storage persistent id has {len(pid)} fields, expected {expected}")
        storage_type, key, location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise _Reject(f"storage type is {_kind(storage_type)}, not a torch storage class")
        if type(key) is not str:
            raise _Reject(f"storage key is {_kind(key)}, not a string")
        if type(location) not in (str, bytes):
            raise _Reject(f"storage location is {_kind(location)}, not a device name")
        numel = _count(numel, f"the element count of storage {_quote(key)}")
        previous = self.declared.setdefault(key, (storage_type, numel))
        if previous[0] is not storage_type or previous[1] != numel:
            raise _Reject(f"storage {_quote(key)} is declared twice with different types or sizes")
        itemsize = storage_type.dtype.itemsize
        if not self.legacy or pid[5] is None:
            return _StorageRef(key, storage_type.dtype, storage_type.untyped, 0, numel)
        view = pid[5]
        if type(view) is not tuple or len(view) != 3 or type(view[0]) is not str:
            raise _Reject(f"storage {_quote(key)} has a malformed view description")
        view_offset = _count(view[1], "a storage view offset")
        view_numel = _count(view[2], "a storage view size")
        if view_offset + view_numel > numel:
            raise _Reject(f"a view runs past the end of storage {_quote(key)}")
        return _StorageRef(
            key, storage_type.dtype, storage_type.untyped, view_offset * itemsize, view_numel
        )


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can build dicts, lists and inert tensor descriptions, and nothing else.

    Every global goes through :meth:`find_class`, which answers from the allow-list of
    stand-ins; the only persistent ids accepted are torch's storage tuples. Nothing from torch
    (or anything else the file names) is imported.
    """

    def __init__(self, file: BinaryIO, storages: _Storages | None) -> None:
        super().__init__(file, encoding="utf-8")
        self._storages = storages

    def find_class(self, module: str, name: str) -> object:
        qualname = f"{module}.{name}"
        try:
            return _ALLOWED_GLOBALS[qualname]
        except KeyError:
            raise _Reject(
                f"refuses to load global {_quote(qualname)} (only tensor data is allowed)"
            ) from None

    def persistent_load(self, pid: object) -> object:
        if self._storages is None:
            raise _Reject("a header pickle refers to external data, which it never does")
        return self._storages.declare(pid)


class _BoundedReader:
    """File view for the pre-scan: never asks the OS for more than the file holds.

    A pickle's declared lengths would otherwise go straight to ``read``, and a buffered file
    allocates that many bytes up front, so a 10-byte file could ask for 2**60. The position is
    tracked here because ``BufferedReader.tell`` costs a system call per opcode.
    """

    def __init__(self, file: BinaryIO, size: int) -> None:
        self._file = file
        self._size = size
        self._pos = file.tell()

    def read(self, n: int) -> bytes:
        data = self._file.read(min(n, max(self._size - self._pos, 0)))
        self._pos += len(data)
        return data

    def readline(self, limit: int) -> bytes:
        data = self._file.readline(limit)
        self._pos += len(data)
        return data

    def tell(self) -> int:
        return self._pos


# Opcode byte -> pickletools' description (name, argument layout) for every protocol 0-5 opcode.
_OPCODES: Final = MappingProxyType(
    {op.code.encode("latin-1")[0]: op for op in pickletools.opcodes}
)
_LENGTH_PREFIX: Final = MappingProxyType(
    {
        pickletools.TAKEN_FROM_ARGUMENT1: struct.Struct("<B"),
        pickletools.TAKEN_FROM_ARGUMENT4: struct.Struct("<i"),
        pickletools.TAKEN_FROM_ARGUMENT4U: struct.Struct("<I"),
        pickletools.TAKEN_FROM_ARGUMENT8U: struct.Struct("<Q"),
    }
)
_MEMO_INDEX: Final = MappingProxyType(
    {"BINPUT": struct.Struct("<B"), "LONG_BINPUT": struct.Struct("<I")}
)


def _prescan(file: _BoundedReader | io.BytesIO, what: str) -> None:
    """Walk one pickle's opcodes up to STOP without building or decoding anything.

    The C unpickler allocates a declared length before reading it and sizes (and zero-fills) its
    memo table from the largest index it is given, so a tiny hostile pickle could make it claim
    gigabytes. This walk proves every declared length is really present and keeps memo indices
    within the pickle's own size first. It also refuses the protocol-0 STRING opcode, whose
    escape decoding torch.save never needs. On return the file is positioned right after STOP.
    """
    start = file.tell()

    def take(n: int) -> bytes:
        data = file.read(n)
        if len(data) != n:
            raise _Reject(f"is truncated: the {what} pickle ends in the middle of an opcode")
        return data

    def take_line() -> bytes:
        line = file.readline(_READLINE_LIMIT)
        if not line.endswith(b"\n"):
            raise _Reject(f"the {what} pickle has an unterminated or overlong text argument")
        return line

    while True:
        pos = file.tell() - start
        if pos > _MAX_PICKLE_BYTES:
            raise _Reject(f"the {what} pickle is larger than {_MAX_PICKLE_BYTES} bytes")
        opcode = file.read(1)
        if not opcode:
            raise _Reject(f"is truncated: the {what} pickle ends before its STOP opcode")
        code = opcode[0]
        op = _OPCODES.get(code)
        if op is None:
            raise _Reject(f"the {what} pickle has an unknown opcode 0x{code:02x} at byte {pos}")
        if op.name == "STOP":
            return
        if op.name == "STRING":
            raise _Reject(f"the {what} pickle uses the text STRING opcode; torch never writes it")
        layout = op.arg
        if layout is None:
            continue
        if layout.n >= 0:
            data = take(layout.n)
        elif layout.n == pickletools.UP_TO_NEWLINE:
            data = take_line()
            if layout is pickletools.stringnl_noescape_pair:  # GLOBAL / INST: module, name
                take_line()
        else:
            prefix = _LENGTH_PREFIX[layout.n]
            (length,) = prefix.unpack(take(prefix.size))
            if length < 0:
                raise _Reject(f"the {what} pickle declares a negative length at byte {pos}")
            data = take(length)
        if op.name in _MEMO_INDEX:
            (index,) = _MEMO_INDEX[op.name].unpack(data)
        elif op.name == "PUT":
            try:
                index = int(data)
            except ValueError:
                raise _Reject(f"the {what} pickle has a bad memo index at byte {pos}") from None
        else:
            continue
        if not 0 <= index <= pos:  # a real pickler numbers memo slots 0, 1, 2, ... as it goes
            raise _Reject(f"the {what} pickle uses memo slot {index} out of range")


def _unpickle(data: bytes, storages: _Storages | None) -> object:
    return _RestrictedUnpickler(io.BytesIO(data), storages).load()


def _next_pickle(file: BinaryIO, size: int, what: str, storages: _Storages | None) -> object:
    """Unpickle the pickle starting at the file position; leave the position right after it."""
    start = file.tell()
    if start >= size:
        raise _Reject(f"is truncated: the {what} pickle is missing")
    _prescan(_BoundedReader(file, size), what)
    end = file.tell()
    file.seek(start)
    data = file.read(end - start)
    return _unpickle(data, storages)


# --------------------------------------------------------------------------------------------
# Picking the state dict out of the unpickled object
# --------------------------------------------------------------------------------------------


def _is_tensor_dict(value: object) -> bool:
    return isinstance(value, dict) and all(
        type(k) is str and isinstance(v, _TensorRef) for k, v in value.items()
    )


def _first_non_tensor(value: dict[object, object], where: str) -> str:
    for k, v in value.items():
        if type(k) is not str:
            return f"{where} has a key that is {_kind(k)}; state dict keys are strings"
        if not isinstance(v, _TensorRef):
            return f"{where}[{_quote(k)}] is {_kind(v)}, not a tensor"
    return f"{where} is not a state dict"  # pragma: no cover - callers pass non-tensor dicts


def _select_state_dict(obj: object) -> dict[str, _TensorRef]:
    """Find the name -> tensor mapping, directly or under one conventional wrapper key."""
    if not isinstance(obj, dict):
        raise _Reject(
            f"holds {_kind(obj)} at the top level, not a state dict (a dict of name -> tensor)"
        )
    if _is_tensor_dict(obj):
        return obj  # type: ignore[return-value]
    if len(obj) == 1 and type(next(iter(obj))) is str:
        options = list(obj)
    else:
        options = [k for k in _WRAPPER_KEYS if k in obj]
    wrapped = [k for k in options if _is_tensor_dict(obj[k])]
    if len(wrapped) == 1:
        return obj[wrapped[0]]  # type: ignore[no-any-return]
    if len(wrapped) > 1:
        raise _Reject(
            f"wraps several state dicts ({', '.join(_quote(k) for k in wrapped)}); "
            "cannot tell which one holds the model"
        )
    nested = [k for k in options if isinstance(obj[k], dict)]
    problem = (
        _first_non_tensor(obj[nested[0]], f"[{_quote(nested[0])}]")
        if nested
        else _first_non_tensor(obj, "the top-level dict")
    )
    keys = ", ".join(_quote(k, 40) for k in list(obj)[:8]) + (", ..." if len(obj) > 8 else "")
    raise _Reject(
        f"holds no state dict: {problem}. Expected name -> tensor entries, or a dict wrapping "
        f"them under one of {', '.join(_WRAPPER_KEYS)} (top-level keys: {keys})"
    )


# --------------------------------------------------------------------------------------------
# Reading storages and building arrays
# --------------------------------------------------------------------------------------------


def _check_expansion(tensors: Mapping[str, _TensorRef], storage_bytes: int) -> None:
    total = sum(ref.nbytes for ref in tensors.values())
    limit = _EXPANSION_FACTOR * storage_bytes + _EXPANSION_SLACK_BYTES
    if total > limit:
        raise _Reject(
            f"its tensors would expand {storage_bytes} bytes of storage into {total} bytes "
            f"(limit {limit}); overlapping strides this large are not a real state dict"
        )


def _swap_unit(dtype: np.dtype) -> int:
    return dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize


def _materialize(ref: _TensorRef, buffer: bytes | None, swap_bytes: bool) -> np.ndarray:
    """Copy one tensor out of its storage bytes into a fresh C-contiguous, writeable array."""
    if buffer is None:  # an empty tensor: it needs (and was given) no storage bytes
        return np.zeros(ref.shape, dtype=ref.dtype)
    itemsize = ref.dtype.itemsize
    span = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.strides)) + 1
    flat = np.frombuffer(
        buffer, dtype=ref.dtype, count=span - ref.offset,
        offset=ref.storage.byte_offset + ref.offset * itemsize,
    )
    view = np.lib.stride_tricks.as_strided(
        flat, shape=ref.shape, strides=tuple(s * itemsize for s in ref.strides), writeable=False
    )
    array = np.array(view, dtype=ref.dtype, order="C", copy=True)
    if swap_bytes and itemsize > 1:
        array.reshape(-1).view(f"u{_swap_unit(ref.dtype)}").byteswap(inplace=True)
    if ref.negate:
        np.negative(array, out=array)
    if ref.conjugate and ref.dtype.kind == "c":
        np.conjugate(array, out=array)
    return array


def _build(
    tensors: Mapping[str, _TensorRef], buffers: Mapping[str, bytes], file_order: str
) -> dict[str, np.ndarray]:
    swap = file_order != sys.byteorder
    return {
        name: _materialize(ref, buffers[ref.storage.key] if ref.numel else None, swap)
        for name, ref in tensors.items()
    }


def _storage_nbytes(declared: tuple[_StorageType, int]) -> int:
    storage_type, numel = declared
    return numel * storage_type.dtype.itemsize


def _needed_keys(tensors: Mapping[str, _TensorRef]) -> dict[str, None]:
    return {ref.storage.key: None for ref in tensors.values() if ref.numel}


def _run_check(tensors: Mapping[str, _TensorRef], check: Callable[[TensorShapes], None] | None
               ) -> None:
    """Let the caller compare names and shapes with its model before any tensor data is read:
    a checkpoint of the wrong architecture (or a trap posing as one) then costs nothing."""
    if check is not None:
        check(MappingProxyType({name: (ref.shape, ref.dtype) for name, ref in tensors.items()}))


def _check_inflation(tensors: Mapping[str, _TensorRef], members: Mapping[str, zipfile.ZipInfo]
                     ) -> None:
    """Refuse compressed entries that would inflate to more than the tensors can hold, or to
    far more than their compressed size (see _MAX_INFLATE_RATIO), before inflating any."""
    compressed = [info for info in members.values() if info.compress_type != zipfile.ZIP_STORED]
    if not compressed:
        return
    inflated = sum(info.file_size for info in compressed)
    packed = sum(info.compress_size for info in compressed)
    tensor_bytes = sum(ref.nbytes for ref in tensors.values())
    if inflated > _MAX_INFLATE_RATIO * packed + _INFLATE_SLACK_BYTES:
        why = f"more than {_MAX_INFLATE_RATIO} times their compressed size"
    elif inflated > tensor_bytes + _INFLATE_SLACK_BYTES:
        why = f"more than the {tensor_bytes} bytes its tensors hold"
    else:
        return
    raise _Reject(
        f"has {len(compressed)} compressed storage entries that would inflate {packed} bytes "
        f"into {inflated} bytes, {why}; refused before inflating (torch.save never compresses)"
    )


# --------------------------------------------------------------------------------------------
# The two layouts
# --------------------------------------------------------------------------------------------


def _load_legacy(file: BinaryIO, size: int, check: Callable[[TensorShapes], None] | None
                 ) -> dict[str, np.ndarray]:
    magic = _next_pickle(file, size, "magic number", None)
    if type(magic) is not int or magic != _MAGIC_NUMBER:
        raise _Reject("is a pickle but not a torch.save file (wrong magic number)")
    version = _next_pickle(file, size, "protocol version", None)
    if type(version) is not int or version != _LEGACY_PROTOCOL_VERSION:
        raise _Reject(
            f"has legacy protocol version {_describe(version)}, "
            f"expected {_LEGACY_PROTOCOL_VERSION}"
        )
    # sys_info records the writer's native byte order and C type sizes. torch ignores it on
    # load: legacy storages are always written little-endian with 64-bit counts.
    if not isinstance(_next_pickle(file, size, "sys info", None), dict):
        raise _Reject("has a malformed sys info header")
    storages = _Storages(legacy=True)
    obj = _next_pickle(file, size, "main", storages)
    keys = _next_pickle(file, size, "storage key list", None)
    if type(keys) is not list or not all(type(k) is str for k in keys):
        raise _Reject("has a malformed storage key list")
    tensors = _select_state_dict(obj)
    _run_check(tensors, check)
    needed = _needed_keys(tensors)
    _check_expansion(tensors, sum(_storage_nbytes(storages.declared[k]) for k in needed))

    buffers: dict[str, bytes] = {}
    listed: set[str] = set()
    for key in keys:
        if key in listed:
            raise _Reject(f"lists storage {_quote(key)} twice")
        listed.add(key)
        if key not in storages.declared:
            raise _Reject(f"lists storage {_quote(key)}, which no object in the pickle uses")
        storage_type, numel = storages.declared[key]
        header = file.read(8)
        if len(header) != 8:
            raise _Reject(f"is truncated: the data of storage {_quote(key)} is missing")
        (count,) = struct.unpack("<q", header)
        if count != numel:
            raise _Reject(
                f"storage {_quote(key)} holds {count} elements but the pickle declares {numel}"
            )
        nbytes = numel * storage_type.dtype.itemsize
        remaining = size - file.tell()
        if nbytes > remaining:
            raise _Reject(
                f"is truncated: storage {_quote(key)} needs {nbytes} bytes, {remaining} remain"
            )
        if key in needed:
            buffers[key] = file.read(nbytes)
        else:
            file.seek(nbytes, os.SEEK_CUR)
    unlisted = [k for k in storages.declared if k not in listed]
    if unlisted:
        raise _Reject(f"storage {_quote(unlisted[0])} is used by the pickle but has no data")
    return _build(tensors, buffers, "little")


def _check_member(info: zipfile.ZipInfo, archive_size: int) -> None:
    """Refuse an entry whose header cannot be honest before a single byte is inflated."""
    name = _quote(info.filename)
    if info.flag_bits & 0x1:
        raise _Reject(f"entry {name} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise _Reject(
            f"entry {name} uses compression method {info.compress_type}, not stored or deflate"
        )
    if info.header_offset + info.compress_size > archive_size:
        raise _Reject(f"entry {name} runs past the end of the file")
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise _Reject(f"entry {name} is stored uncompressed but its two sizes disagree")
    if info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 1024:
        raise _Reject(
            f"entry {name} claims {info.file_size} bytes from {info.compress_size} compressed "
            "bytes, more than deflate can produce (a zip bomb or a corrupt archive)"
        )


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive_size: int) -> bytes:
    _check_member(info, archive_size)
    with zf.open(info) as member:
        data = member.read()
    if len(data) != info.file_size:
        raise _Reject(f"entry {_quote(info.filename)} is truncated")
    return data


def _load_zip(file: BinaryIO, size: int, check: Callable[[TensorShapes], None] | None
              ) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(file) as zf:
        infos = {info.filename: info for info in zf.infolist()}
        pickles = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise _Reject(
                "is a zip archive but not a torch.save checkpoint: expected exactly one "
                f"'<folder>/data.pkl', found {len(pickles)}"
            )
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "constants.pkl" in infos:
            raise _Reject(
                "is a TorchScript archive (torch.jit.save), not a torch.save checkpoint of weights"
            )
        file_order = "little"
        order_info = infos.get(prefix + "byteorder")
        if order_info is not None:
            raw_order = _read_member(zf, order_info, size) if order_info.file_size <= 16 else b""
            if raw_order not in (b"little", b"big"):
                raise _Reject("has a byteorder record that is neither 'little' nor 'big'")
            file_order = raw_order.decode("ascii")

        pickle_info = infos[pickles[0]]
        if pickle_info.file_size > _MAX_PICKLE_BYTES:
            raise _Reject(f"has a data.pkl larger than {_MAX_PICKLE_BYTES} bytes")
        if (pickle_info.compress_type != zipfile.ZIP_STORED
                and pickle_info.file_size > _MAX_COMPRESSED_PICKLE_BYTES):
            raise _Reject(
                f"has a compressed data.pkl that would inflate to {pickle_info.file_size} bytes "
                f"(limit {_MAX_COMPRESSED_PICKLE_BYTES} for a compressed pickle)"
            )
        data = _read_member(zf, pickle_info, size)
        _prescan(io.BytesIO(data), "data.pkl")
        storages = _Storages(legacy=False)
        tensors = _select_state_dict(_unpickle(data, storages))
        del data
        _run_check(tensors, check)

        needed = _needed_keys(tensors)
        members: dict[str, zipfile.ZipInfo] = {}
        for key in needed:
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise _Reject(
                    f"storage {_quote(key)} is missing (no entry {_quote(prefix + 'data/' + key)})"
                )
            expected = _storage_nbytes(storages.declared[key])
            if info.file_size != expected:
                raise _Reject(
                    f"storage entry {_quote(info.filename)} holds {info.file_size} bytes but "
                    f"the pickle declares {expected}"
                )
            _check_member(info, size)
            members[key] = info
        _check_expansion(tensors, sum(info.file_size for info in members.values()))
        _check_inflation(tensors, members)
        buffers = {key: _read_member(zf, info, size) for key, info in members.items()}
    return _build(tensors, buffers, file_order)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _open_regular_file(path: str | os.PathLike[str]) -> BinaryIO:
    """Open for reading, refusing FIFOs, devices and folders, which would block or never end
    (an empty file is read, and refused for what it lacks)."""
    try:
        return open_regular_file(path, allow_empty=True)  # type: ignore[return-value]
    except Refused as exc:
        raise _Reject(str(exc)) from None


def load_state_dict(
    path: str | os.PathLike[str], *, check: Callable[[TensorShapes], None] | None = None
) -> dict[str, np.ndarray]:
    """Load a PyTorch state dict as numpy arrays, safely, without PyTorch installed.

    Downloaded weights must never be able to run code, and the converters downstream must not
    care how torch laid a tensor out, so every array comes back as an independent, writeable,
    C-contiguous copy with torch's shape, strides and storage offset already applied, in the
    file's key order.

    The file may hold the state dict itself (``torch.save(model.state_dict(), path)``), or a dict
    wrapping it under one conventional key (``state_dict``, ``model_state_dict``, ``model``,
    ``module``, ``net`` or ``weights``), or under a dict's only key, as training scripts save
    checkpoints next to epoch counters and optimizer state; the other entries are then ignored,
    but must still be plain data, since they are unpickled under the same allow-list.

    bfloat16 and float8 tensors are returned with the ``ml_dtypes`` dtypes (which jax uses
    natively), so no precision is lost and ``jnp.asarray`` keeps them as they are.

    ``check``, if given, sees every tensor's name, shape and dtype as soon as the pickle is
    parsed, before any tensor data is read or inflated; whatever it raises propagates unchanged.
    Pass a comparison with the model, so a checkpoint of the wrong architecture (or a trap posing
    as one) is refused at the cost of its pickle. Compressed zip entries (torch.save never writes
    them) may inflate to no more than the tensors hold, nor more than 16 times their stored size.

    Raises:
        CheckpointError: the file cannot be read, is truncated or corrupt, is not a torch.save
            file, refers to anything but tensor data (the message names the refused global as
            ``module.name``), or describes tensors that do not fit their stored bytes.
    """
    shown = os.fspath(path)
    try:
        with _open_regular_file(path) as file:
            size = os.fstat(file.fileno()).st_size
            head = file.read(512)
            file.seek(0)
            if not head:
                raise _Reject("is empty")
            if head.startswith(b"PK\x03\x04"):
                return _load_zip(file, size, check)
            if head.startswith(b"\x80"):
                return _load_legacy(file, size, check)
            if head[257:262] == b"ustar":
                raise _Reject("is a tar archive (the oldest torch.save layout): not supported")
            raise _Reject("is not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    except _Reject as exc:
        raise CheckpointError(f"checkpoint {shown}: {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {shown}: cannot be read: {exc.strerror or exc}") from exc
    except _MALFORMED_INPUT_ERRORS as exc:
        detail = str(exc)
        detail = detail if len(detail) <= 200 else detail[:197] + "..."
        raise CheckpointError(
            f"checkpoint {shown}: is corrupt or not a PyTorch checkpoint "
            f"({type(exc).__name__}: {detail})"
        ) from exc


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in chunks so multi-gigabyte weights never sit in memory.

    Used to record exactly which weights file a converted model came from.

    Raises:
        CheckpointError: the file cannot be read.
    """
    digest = hashlib.sha256()
    try:
        with _open_regular_file(path) as file:
            while chunk := file.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
    except _Reject as exc:
        raise CheckpointError(f"checkpoint {os.fspath(path)}: {exc}") from None
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)}: cannot be read: {exc.strerror or exc}"
        ) from exc
    return digest.hexdigest()
