"""Test-only writer of Caffe ``.caffemodel`` files: protobuf wire format encoded by hand, so the
reader is tested without Caffe or the protobuf package, and broken files can be built from
the same parts.

Field numbers follow Caffe's ``caffe.proto`` (``NetParameter.layers`` = 2 for V1 layers,
``NetParameter.layer`` = 100; ``V1LayerParameter`` name 4, type 5, blobs 6; ``LayerParameter``
name 1, type 2, blobs 7; ``BlobProto`` num/channels/height/width 1-4, data 5, diff 6, shape 7,
double_data 8; ``BlobShape.dim`` 1).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

import numpy as np

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5
#: V1LayerParameter.LayerType values used here (CONVOLUTION, INNER_PRODUCT, RELU, POOLING).
V1_TYPES = {"Convolution": 4, "InnerProduct": 14, "ReLU": 18, "Pooling": 17}


def varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int32/int64 negatives are ten-byte two's complement on the wire
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def key(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def length_field(field: int, payload: bytes) -> bytes:
    return key(field, LENGTH) + varint(len(payload)) + payload


def varint_field(field: int, value: int) -> bytes:
    return key(field, VARINT) + varint(value)


def blob(array: np.ndarray, *, legacy: bool = False, packed: bool = True,
         packed_dims: bool = True, double: bool = False, diff: bool = False) -> bytes:
    """A BlobProto of ``array``: shape as BlobShape (or the legacy four fields, padded with
    leading ones as Caffe's V1 files do), data packed or one fixed32 field per value."""
    shape = tuple(array.shape)
    out = bytearray()
    if legacy:
        padded = (1,) * (4 - len(shape)) + shape
        for field, dim in zip((1, 2, 3, 4), padded, strict=True):
            out += varint_field(field, dim)
    else:
        if packed_dims:
            dims = length_field(1, b"".join(varint(d) for d in shape))
        else:
            dims = b"".join(varint_field(1, d) for d in shape)
        out += length_field(7, dims)
    flat = np.ascontiguousarray(array).reshape(-1)
    if double:
        out += length_field(8, flat.astype("<f8").tobytes())
    elif packed:
        out += length_field(5, flat.astype("<f4").tobytes())
    else:
        for value in flat.astype("<f4"):
            out += key(5, FIXED32) + struct.pack("<f", float(value))
    if diff:  # training gradients some snapshots carry: the reader must skip them
        out += length_field(6, np.ones(flat.size, "<f4").tobytes())
    return bytes(out)


def layer(name: str, kind: str, blobs: Sequence[bytes] = (), *, v1: bool = False,
          extra: bytes = b"") -> bytes:
    """One layer message (V1LayerParameter or LayerParameter), with encoded blobs."""
    if v1:
        body = length_field(4, name.encode()) + varint_field(5, V1_TYPES.get(kind, 0))
        body += b"".join(length_field(6, b) for b in blobs)
    else:
        body = length_field(1, name.encode()) + length_field(2, kind.encode())
        body += b"".join(length_field(7, b) for b in blobs)
    return body + extra


def net(layers: Iterable[bytes], *, v1: bool = False, name: str = "GoogleNet") -> bytes:
    """A NetParameter holding ``layers`` in the V1 (``layers`` = 2) or current (``layer`` =
    100) field."""
    field = 2 if v1 else 100
    return length_field(1, name.encode()) + b"".join(length_field(field, lay) for lay in layers)


def caffemodel(params: dict[str, Sequence[np.ndarray]], *, v1: bool = False,
               passive: Iterable[str] = ("conv1/relu_7x7", "pool1/3x3_s2"),
               **blob_options: bool) -> bytes:
    """A whole file: one layer per ``params`` entry (name -> blobs), plus a few blob-less
    layers such as a real file has; Convolution unless the name says classifier."""
    layers = [layer(name, "ReLU" if "relu" in name else "Pooling", v1=v1) for name in passive]
    for name, arrays in params.items():
        kind = "InnerProduct" if "classifier" in name or "fc" in name else "Convolution"
        layers.append(layer(name, kind, [blob(a, legacy=v1, **blob_options) for a in arrays],
                            v1=v1))
    return net(layers, v1=v1)


# ----------------------------------------------------------------- GoogLeNet-shaped parameters

#: inception_*: 1x1, 3x3_reduce, 3x3, 5x5_reduce, 5x5, pool_proj (num_output in BVLC's
#: models/bvlc_googlenet/deploy.prototxt, written out here independently of jaxdream's table).
INCEPTION = {"3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64),
             "4a": (192, 96, 208, 16, 48, 64), "4b": (160, 112, 224, 24, 64, 64),
             "4c": (128, 128, 256, 24, 64, 64), "4d": (112, 144, 288, 32, 64, 64),
             "4e": (256, 160, 320, 32, 128, 128), "5a": (256, 160, 320, 32, 128, 128),
             "5b": (384, 192, 384, 48, 128, 128)}


def googlenet_shapes(classes: int = 1000) -> dict[str, tuple[tuple[int, ...], int]]:
    """Caffe layer name -> (weight shape OIHW or (out, in), padding) of every learned layer
    of the deploy prototxt."""
    shapes = {"conv1/7x7_s2": ((64, 3, 7, 7), 3), "conv2/3x3_reduce": ((64, 64, 1, 1), 0),
              "conv2/3x3": ((192, 64, 3, 3), 1)}
    cin = 192
    for block, (c1, c3r, c3, c5r, c5, proj) in INCEPTION.items():
        p = f"inception_{block}/"
        shapes.update({p + "1x1": ((c1, cin, 1, 1), 0), p + "3x3_reduce": ((c3r, cin, 1, 1), 0),
                       p + "3x3": ((c3, c3r, 3, 3), 1), p + "5x5_reduce": ((c5r, cin, 1, 1), 0),
                       p + "5x5": ((c5, c5r, 5, 5), 2), p + "pool_proj": ((proj, cin, 1, 1), 0)})
        cin = c1 + c3 + c5 + proj
    shapes["loss3/classifier"] = ((classes, cin), 0)
    return shapes


def googlenet_params(seed: int, classes: int = 1000) -> dict[str, list[np.ndarray]]:
    """He-scaled random weights and non-trivial biases, so no endpoint is degenerate."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, (shape, _) in googlenet_shapes(classes).items():
        fan_in = int(np.prod(shape[1:]))
        params[name] = [rng.normal(0, (2.0 / fan_in) ** 0.5, shape).astype(np.float32),
                        rng.normal(0, 0.5, shape[0]).astype(np.float32)]
    return params
