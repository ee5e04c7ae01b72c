"""Test-only writer of PyTorch checkpoint files, in both on-disk layouts, without PyTorch.

It pickles the way ``torch.save`` does -- protocol 2, and a Pickler whose ``persistent_id``
turns every storage into ``('storage', <torch.XStorage global>, key, location, numel)`` (plus a
view field in the legacy layout) -- so the reader can be tested where torch is not installed, and
hostile or broken variants can be assembled from the same parts:

* :class:`Global` writes a GLOBAL opcode for any ``module.name`` without importing it;
* :class:`Call` writes ``func(*args)`` as REDUCE, which is how torch rebuilds tensors and how an
  attacker runs code;
* :class:`PersistentId` writes an arbitrary persistent id;
* :func:`legacy_bytes` / :func:`zip_bytes` take overrides for every header and record.

Layouts follow ``torch/serialization.py`` (``_legacy_save``, ``_save``) of torch 2.x.
"""

from __future__ import annotations

import collections
import functools
import io
import pickle
import struct
import sys
import zipfile
from collections.abc import Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
DEFAULT_SYS_INFO = {
    "protocol_version": PROTOCOL_VERSION,
    "little_endian": True,
    "type_sizes": {"short": 2, "int": 4, "long": 4},
}

# dtypes torch writes with a legacy typed storage class and _rebuild_tensor_v2 ...
STORAGE_NAMES: dict[np.dtype, str] = {
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
    np.dtype(np.complex64): "ComplexFloatStorage",
    np.dtype(np.complex128): "ComplexDoubleStorage",
}
# ... and those it writes as an UntypedStorage plus a dtype, with _rebuild_tensor_v3.
V3_DTYPE_NAMES: dict[np.dtype, str] = {
    np.dtype(np.uint16): "uint16",
    np.dtype(np.uint32): "uint32",
    np.dtype(np.uint64): "uint64",
    np.dtype(ml_dtypes.float8_e4m3fn): "float8_e4m3fn",
    np.dtype(ml_dtypes.float8_e5m2): "float8_e5m2",
}


class Global:
    """``module.name`` as a GLOBAL opcode; nothing is imported, so any name can be written."""

    def __init__(self, module: str, name: str) -> None:
        self.module = module
        self.name = name

    def __call__(self, *args: object) -> object:  # pickle insists REDUCE targets be callable
        raise TypeError("a Global only exists to be pickled")

    def __repr__(self) -> str:
        return f"Global({self.module}.{self.name})"


@functools.cache
def G(dotted: str) -> Global:
    """The (shared, so memoised like torch's) Global for a dotted name."""
    module, _, name = dotted.rpartition(".")
    return Global(module, name)


class Call:
    """``func(*args)``, written as REDUCE."""

    def __init__(self, func: str | Global, *args: object) -> None:
        self.func = G(func) if isinstance(func, str) else func
        self.args = args

    def __call__(self, *args: object) -> object:  # a Call may itself be called (chained attack)
        raise TypeError("a Call only exists to be pickled")

    def __reduce__(self) -> tuple[Any, tuple[object, ...]]:
        return (self.func, self.args)


class PersistentId:
    """Written as BINPERSID with exactly this id, to build malformed storage references."""

    def __init__(self, pid: object) -> None:
        self.pid = pid


class Storage:
    """A flat numpy array saved as one torch storage; share the object to share the storage."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = np.ascontiguousarray(data).reshape(-1)
        self.untyped = self.data.dtype in V3_DTYPE_NAMES

    @property
    def numel(self) -> int:
        """Elements for typed storages, bytes for untyped ones, as torch records them."""
        return self.data.nbytes if self.untyped else self.data.size

    @property
    def storage_type(self) -> Global:
        if self.untyped:
            return G("torch.storage.UntypedStorage")
        return G(f"torch.{STORAGE_NAMES[self.data.dtype]}")

    def raw(self, byteorder: str = "little") -> bytes:
        data = self.data
        if byteorder != sys.byteorder and data.dtype.itemsize > 1:
            unit = data.dtype.itemsize // (2 if data.dtype.kind == "c" else 1)
            data = data.view(f"u{unit}").byteswap()
        return data.tobytes()


class Tensor:
    """A view into a :class:`Storage`, pickled with torch's rebuild functions.

    ``offset``, ``shape`` and ``strides`` are written as given (in elements), so tests can also
    write ones that do not fit the storage.
    """

    def __init__(
        self,
        storage: Storage,
        offset: object,
        shape: object,
        strides: object,
        *,
        requires_grad: bool = False,
        metadata: dict[str, bool] | None = None,
    ) -> None:
        self.storage = storage
        self.offset = offset
        self.shape = shape
        self.strides = strides
        self.requires_grad = requires_grad
        self.metadata = metadata

    def __reduce__(self) -> tuple[Any, tuple[object, ...]]:
        hooks: collections.OrderedDict[object, object] = collections.OrderedDict()
        args: tuple[object, ...] = (
            self.storage,
            self.offset,
            self.shape,
            self.strides,
            self.requires_grad,
            hooks,
        )
        if self.storage.untyped:
            dtype_name = V3_DTYPE_NAMES[self.storage.data.dtype]
            func = G("torch._utils._rebuild_tensor_v3")
            args += (G(f"torch.{dtype_name}"),)
        else:
            func = G("torch._utils._rebuild_tensor_v2")
        if self.metadata:
            args += (self.metadata,)
        return (func, args)


def tensor(array: np.ndarray) -> Tensor:
    """A contiguous tensor holding ``array`` (with its own storage)."""
    array = np.ascontiguousarray(array)
    strides = tuple(s // array.itemsize for s in array.strides)
    return Tensor(Storage(array), 0, tuple(array.shape), strides)


def parameter(inner: Tensor, *, state: dict[str, object] | None = None) -> Call:
    """``nn.Parameter`` as torch pickles it (state dicts saved with ``keep_vars=True``)."""
    hooks: collections.OrderedDict[object, object] = collections.OrderedDict()
    if state is None:
        return Call("torch._utils._rebuild_parameter", inner, True, hooks)
    return Call("torch._utils._rebuild_parameter_with_state", inner, True, hooks, state)


def state_dict(
    items: Mapping[str, object], metadata: dict[str, object] | None = None
) -> collections.OrderedDict[str, object]:
    """An OrderedDict like ``Module.state_dict()``, including its ``_metadata`` attribute."""
    result: collections.OrderedDict[str, object] = collections.OrderedDict(items)
    result._metadata = (  # type: ignore[attr-defined]
        metadata if metadata is not None else collections.OrderedDict({"": {"version": 1}})
    )
    return result


class _TorchPickler(pickle._Pickler):  # type: ignore[name-defined,misc]
    """Protocol-2 pickler with torch's persistent ids and GLOBALs for :class:`Global`."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def __init__(self, file: io.BytesIO, *, legacy: bool) -> None:
        super().__init__(file, protocol=2)
        self.legacy = legacy
        self.storages: dict[str, Storage] = {}
        self._keys: dict[int, str] = {}

    def save_global_ref(self, obj: Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
        self.memoize(obj)

    dispatch[Global] = save_global_ref

    def persistent_id(self, obj: object) -> object:
        if isinstance(obj, PersistentId):
            return obj.pid
        if isinstance(obj, Storage):
            key = self._keys.setdefault(id(obj), str(len(self._keys)))
            self.storages[key] = obj
            pid = ("storage", obj.storage_type, key, "cpu", obj.numel)
            return pid + (None,) if self.legacy else pid
        return None


def dump_main_pickle(obj: object, *, legacy: bool) -> tuple[bytes, dict[str, Storage]]:
    """The object pickle and the storages it refers to, keyed as in the file."""
    out = io.BytesIO()
    pickler = _TorchPickler(out, legacy=legacy)
    pickler.dump(obj)
    return out.getvalue(), pickler.storages


def legacy_bytes(
    obj: object,
    *,
    magic: object = MAGIC_NUMBER,
    protocol_version: object = PROTOCOL_VERSION,
    sys_info: object = None,
    main_pickle: bytes | None = None,
    key_order: Iterable[str] | None = None,
    counts: Mapping[str, int] | None = None,
) -> bytes:
    """A file as ``torch.save(obj, f, _use_new_zipfile_serialization=False)`` writes it.

    Overrides: ``main_pickle`` replaces the object pickle verbatim; ``key_order`` replaces the
    storage key list (torch writes the keys sorted as strings); ``counts`` replaces the element
    count written before a storage's bytes.
    """
    out = io.BytesIO()
    pickle.dump(magic, out, protocol=2)
    pickle.dump(protocol_version, out, protocol=2)
    pickle.dump(DEFAULT_SYS_INFO if sys_info is None else sys_info, out, protocol=2)
    data, storages = dump_main_pickle(obj, legacy=True)
    out.write(data if main_pickle is None else main_pickle)
    keys = sorted(storages) if key_order is None else list(key_order)
    pickle.dump(keys, out, protocol=2)
    for key in keys:
        storage = storages[key]
        count = storage.numel if counts is None else counts.get(key, storage.numel)
        out.write(struct.pack("<q", count))
        out.write(storage.raw("little"))
    return out.getvalue()


def zip_bytes(
    obj: object,
    *,
    folder: str = "archive",
    byteorder: str | None = "little",
    compression: int = zipfile.ZIP_STORED,
    data_pkl: bytes | None = None,
    drop_keys: Iterable[str] = (),
    extra_entries: Mapping[str, bytes] | None = None,
) -> bytes:
    """A file as ``torch.save(obj, f)`` (zip layout) writes it.

    ``byteorder=None`` omits the record (old writers); ``'big'`` stores big-endian data as a
    big-endian machine would. ``data_pkl`` replaces the pickle verbatim; ``drop_keys`` leaves
    storages out; ``extra_entries`` adds records (names are full archive paths).
    """
    pickled, storages = dump_main_pickle(obj, legacy=False)
    dropped = set(drop_keys)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compression) as zf:
        zf.writestr(f"{folder}/data.pkl", pickled if data_pkl is None else data_pkl)
        zf.writestr(f"{folder}/.format_version", "1")
        zf.writestr(f"{folder}/.storage_alignment", "64")
        if byteorder is not None:
            zf.writestr(f"{folder}/byteorder", byteorder)
        for key, storage in storages.items():
            if key not in dropped:
                zf.writestr(f"{folder}/data/{key}", storage.raw(byteorder or "little"))
        zf.writestr(f"{folder}/version", "3\n")
        zf.writestr(f"{folder}/.data/serialization_id", "0" * 40)
        for name, data in (extra_entries or {}).items():
            zf.writestr(name, data)
    return out.getvalue()


def set_zip_entry_size(blob: bytes, name: str, file_size: int) -> bytes:
    """Rewrite the uncompressed size an entry claims, in its local and central headers.

    This is how a zip bomb lies: the reader must distrust the claim, not allocate for it.
    """
    data = bytearray(blob)
    encoded = name.encode("utf-8")
    found = 0
    pos = data.find(b"PK\x03\x04")
    while pos != -1:
        (name_len,) = struct.unpack_from("<H", data, pos + 26)
        if bytes(data[pos + 30 : pos + 30 + name_len]) == encoded:
            struct.pack_into("<I", data, pos + 22, file_size)
            found += 1
        pos = data.find(b"PK\x03\x04", pos + 4)
    pos = data.find(b"PK\x01\x02")
    while pos != -1:
        (name_len,) = struct.unpack_from("<H", data, pos + 28)
        if bytes(data[pos + 46 : pos + 46 + name_len]) == encoded:
            struct.pack_into("<I", data, pos + 24, file_size)
            found += 1
        pos = data.find(b"PK\x01\x02", pos + 4)
    if found != 2:
        raise ValueError(f"entry {name!r} not found in both headers")
    return bytes(data)
