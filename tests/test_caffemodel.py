"""The .caffemodel reader: protobuf written by hand in both of Caffe's layouts, and the ways a
file can be broken or hostile. No Caffe, no protobuf package, no torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import caffefmt as cf
from jaxdream.errors import CheckpointError
from jaxdream.models import caffemodel
from jaxdream.models.caffemodel import read_caffemodel, state_dict


def _params(seed: int = 0) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {"conv1/7x7_s2": [rng.normal(size=(4, 3, 7, 7)).astype(np.float32),
                             rng.normal(size=(4,)).astype(np.float32)],
            "loss3/classifier": [rng.normal(size=(5, 8)).astype(np.float32),
                                 rng.normal(size=(5,)).astype(np.float32)]}


def _write(tmp_path: Path, data: bytes, name: str = "net.caffemodel") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


RANKS = {"conv1/7x7_s2.weight": 4, "conv1/7x7_s2.bias": 1, "loss3/classifier.weight": 2,
         "loss3/classifier.bias": 1}

LAYOUTS = {
    "v1-legacy-dims": dict(v1=True),
    "current-packed": dict(v1=False),
    "current-unpacked-floats-and-dims": dict(v1=False, packed=False, packed_dims=False),
    "v1-unpacked-floats": dict(v1=True, packed=False),
    "current-double-with-diffs": dict(v1=False, double=True, diff=True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_both_layouts_and_every_encoding_give_the_same_arrays(tmp_path: Path,
                                                              layout: str) -> None:
    params = _params()
    path = _write(tmp_path, cf.caffemodel(params, **LAYOUTS[layout]))
    layers = read_caffemodel(path)
    assert [lay.name for lay in layers] == ["conv1/relu_7x7", "pool1/3x3_s2", *params]
    assert all(not lay.blobs for lay in layers[:2])
    state = state_dict(layers, RANKS)
    assert set(state) == set(RANKS)
    for name, (weight, bias) in params.items():
        np.testing.assert_array_equal(state[f"{name}.weight"], weight)
        np.testing.assert_array_equal(state[f"{name}.bias"], bias)
        assert state[f"{name}.weight"].flags.owndata or state[f"{name}.weight"].base is not None
    # Legacy shapes come padded to four dimensions and are squeezed only by the key's rank.
    legacy = LAYOUTS[layout].get("v1", False)
    raw = {lay.name: lay.blobs for lay in layers}
    assert raw["loss3/classifier"][1].legacy_shape == legacy
    assert raw["loss3/classifier"][1].array.shape == ((1, 1, 1, 5) if legacy else (5,))


def test_arrays_are_independent_writeable_copies(tmp_path: Path) -> None:
    state = state_dict(read_caffemodel(_write(tmp_path, cf.caffemodel(_params()))), RANKS)
    array = state["conv1/7x7_s2.weight"]
    array[...] = 0  # must not fail (read-only view of the file's bytes) ...
    assert array.dtype == np.float32 and array.flags.c_contiguous


def test_unknown_fields_are_skipped_and_legacy_shapes_left_alone_without_a_rank(
        tmp_path: Path) -> None:
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    extra = cf.varint_field(10, 1) + cf.length_field(3, b"bottom") + (
        cf.key(99, cf.FIXED64) + b"\0" * 8)
    data = cf.net([cf.layer("fc", "InnerProduct", [cf.blob(weight, legacy=True)], v1=True,
                            extra=extra)], v1=True)
    state = state_dict(read_caffemodel(_write(tmp_path, data)), {})
    assert state["fc.weight"].shape == (1, 1, 2, 3)  # no rank given: nothing guessed


def _refusal(tmp_path: Path, data: bytes, match: str) -> str:
    path = _write(tmp_path, data, "bad.caffemodel")
    with pytest.raises(CheckpointError, match=match) as info:
        read_caffemodel(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"caffemodel {path}: ")
    return message


def test_truncated_files_are_refused_in_one_line(tmp_path: Path) -> None:
    data = cf.caffemodel(_params())
    for cut in (1, 7, len(data) // 3, len(data) // 2, len(data) - 1):
        _refusal(tmp_path, data[:cut], "truncated|declares|corrupt|shape")


def test_a_declared_length_beyond_the_file_is_refused_before_allocating(tmp_path: Path) -> None:
    # A data field claiming 2**40 bytes: refused from the header alone, nothing allocated.
    body = cf.length_field(1, b"conv") + cf.key(7, cf.LENGTH) + cf.varint(2**40)
    data = cf.key(100, cf.LENGTH) + cf.varint(len(body)) + body
    _refusal(tmp_path, data, r"declares a field of 1099511627776 bytes in layer\[0\]")


def test_a_file_over_the_size_cap_is_refused_unread(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caffemodel, "MAX_FILE_BYTES", 100)
    _refusal(tmp_path, cf.caffemodel(_params()), "larger than the 100-byte limit")


@pytest.mark.parametrize(("data", "match"), [
    (b"", "is empty"),
    (b'name: "GoogleNet"\nlayer {\n  name: "data"\n}\n', "corrupt|not"),
    (cf.length_field(1, b"GoogleNet"), "holds no layers"),
    (cf.net([cf.layer("a", "ReLU")]) + b"\xff" * 11, "longer than 10 bytes"),
    (cf.key(3, 3) + b"\x00", "group"),
    (b"\x00\x01", "numbered 0"),
    (cf.net([cf.layer("conv", "Convolution", [cf.blob(np.zeros((2, 3), np.float32))[:-4]
                                              + b""])]), "truncated|declares|corrupt|carries"),
    (cf.length_field(2, cf.length_field(1, b"v0 layer")), "V0 layer format"),
    (cf.net([cf.layer("conv", "Convolution", [cf.length_field(7, cf.length_field(1, b"\x02\x03"))
                                              + cf.length_field(5, b"\0" * 20)])]),
     r"shape \(2, 3\) needs 6 values but which carries 5"),
    (cf.net([cf.layer("conv", "Convolution", [cf.length_field(5, b"\0" * 8)])]), "no shape"),
    (cf.net([cf.layer("c", "Convolution", [cf.blob(np.zeros(2, np.float32))]),
             cf.layer("c", "Convolution", [cf.blob(np.zeros(2, np.float32))])]),
     "two layers named 'c'"),
    (cf.net([cf.layer("c", "Convolution", [cf.length_field(7, cf.length_field(1, cf.varint(-1)))
                                           + cf.length_field(5, b"")])]), "negative"),
    (cf.net([cf.layer("c", "Convolution", [cf.length_field(5, b"\0" * 6)])]),
     "not a multiple of 4"),
    (cf.net([cf.length_field(1, b"\xff\xfe")]), "not UTF-8"),
])
def test_malformed_files_are_refused_in_one_line(tmp_path: Path, data: bytes,
                                                 match: str) -> None:
    _refusal(tmp_path, data, match)


def test_a_folder_or_missing_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_caffemodel(tmp_path)
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_caffemodel(tmp_path / "absent.caffemodel")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_corruption_is_a_checkpoint_error_or_a_clean_parse(data: st.DataObject) -> None:
    """Flipped, cut or inserted bytes never crash the reader with anything else."""
    good = bytearray(cf.caffemodel(_params(), v1=data.draw(st.booleans())))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(good) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            good[position] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del good[position:]
            if not good:
                good += b"\x08"
        else:
            good[position:position] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        layers = caffemodel.parse_net(bytes(good))
    except caffemodel._Reject:
        return
    assert all(isinstance(lay.name, str) for lay in layers)
