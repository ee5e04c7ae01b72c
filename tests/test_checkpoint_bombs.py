"""Compressed checkpoints must not be able to take the machine down (issue 17, item 2).

torch.save never compresses a zip entry, but a zip may hold deflated entries, and zlib turns a
few megabytes of zeros into gigabytes. These files are built by hand (the deflate stream is one
compressed MiB repeated, so building a 10 GB claim costs milliseconds) and loaded in a child
process whose peak memory (``ru_maxrss``) is measured; an address-space limit in the child keeps
a regression from eating the shared machine while still failing the test.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import torchfmt as tf
from jaxdream.models import get_spec

MIB = 2**20
#: One hostile entry inflates to this (under 4 GiB: no zip64 needed); three of them make a
#: ~10 MB file that claims about 10.5 GB.
HUGE_ENTRY = 3400 * MIB
F32 = tf.G("torch.FloatStorage")


def _deflated_zeros(total: int) -> bytes:
    """A raw deflate stream of ``total`` zero bytes (a multiple of 1 MiB), built in O(output).

    After a full flush the compressor keeps no history, so every further MiB of zeros compresses
    to the same bytes: compress it once and repeat it.
    """
    assert total % MIB == 0 and total >= 3 * MIB
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = comp.compress(bytes(MIB)) + comp.flush(zlib.Z_FULL_FLUSH)
    again = comp.compress(bytes(MIB)) + comp.flush(zlib.Z_FULL_FLUSH)
    assert comp.compress(bytes(MIB)) + comp.flush(zlib.Z_FULL_FLUSH) == again
    return first + again * (total // MIB - 1) + comp.flush()


def _zip(entries: list[tuple[str, bytes, int, int, int]]) -> bytes:
    """A minimal zip: (name, stored bytes, method, uncompressed size, CRC-32) per entry."""
    out, central = bytearray(), bytearray()
    for name, data, method, size, crc in entries:
        raw = name.encode()
        offset = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc,
                           len(data), size, len(raw), 0) + raw + data
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc,
                               len(data), size, len(raw), 0, 0, 0, 0, 0, offset) + raw
    start = len(out)
    out += central + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries),
                                 len(central), start, 0)
    return bytes(out)


def _tensor(key: str, numel: int, shape: tuple[int, ...]) -> tf.Call:
    strides = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
    pid = tf.PersistentId(("storage", F32, key, "cpu", numel))
    return tf.Call("torch._utils._rebuild_tensor_v2", pid, 0, shape, strides, False, {})


def _checkpoint(tensors: dict[str, tuple[int, tuple[int, ...]]], huge: int) -> bytes:
    """Tensor name -> (storage elements, shape); the first ``huge`` storages are HUGE_ENTRY
    bytes of deflated zeros, the rest honest deflated zeros of their declared size."""
    obj = {name: _tensor(str(i), numel, shape) for i, (name, (numel, shape))
           in enumerate(tensors.items())}
    pickled, _ = tf.dump_main_pickle(obj, legacy=False)
    entries = [("archive/data.pkl", pickled, 0, len(pickled), zlib.crc32(pickled)),
               ("archive/byteorder", b"little", 0, 6, zlib.crc32(b"little"))]
    bomb = _deflated_zeros(HUGE_ENTRY)
    for i, (numel, _) in enumerate(tensors.values()):
        size = numel * 4
        if i < huge:  # its CRC is left at 0: a careful reader refuses it before it could check
            entries.append((f"archive/data/{i}", bomb, 8, size, 0))
        else:
            zeros = bytes(size)
            entries.append((f"archive/data/{i}", zlib.compress(zeros, 9)[2:-4], 8, size,
                            zlib.crc32(zeros)))
    return _zip(entries)


def _torch_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """The state-dict names and (PyTorch-layout) shapes the model expects."""
    spec = get_spec(name)
    module = nnx.eval_shape(lambda: spec.build(nnx.Rngs(0)))
    leaves = {tuple(path): var for path, var in nnx.to_flat_state(nnx.state(module))}
    shapes = {}
    for target, key, transpose in spec.key_map:
        shape = tuple(leaves[target].get_value().shape)
        shapes[key] = tuple(shape[i] for i in np.argsort(transpose)) if transpose else shape
    return shapes


_CHILD = r"""
import json, resource, sys, time
from flax import nnx
from jaxdream.errors import JaxdreamError
from jaxdream.models import get_spec, load_model
from jaxdream.models.checkpoint import load_state_dict

spec = get_spec("efficientnet_lite0")
nnx.eval_shape(lambda: spec.build(nnx.Rngs(0)))  # warm up what load_model builds anyway
with open("/proc/self/statm") as statm:
    vm = int(statm.read().split()[0]) * resource.getpagesize()
# A safety net, not the measurement: a regression gets MemoryError instead of the machine.
resource.setrlimit(resource.RLIMIT_AS, (vm + 3 * 2**30, resource.RLIM_INFINITY))
results = []
for how, path in json.loads(sys.argv[1]):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    try:
        if how == "model":
            load_model("efficientnet_lite0", path)
        else:
            load_state_dict(path)
        outcome = "loaded"
    except JaxdreamError as error:
        outcome = f"{type(error).__name__}: {error}"
    except MemoryError:
        outcome = "MemoryError"
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    results.append({"outcome": outcome, "seconds": time.perf_counter() - started,
                    "peak_growth_mib": grown / 1024})
print(json.dumps(results))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
@pytest.mark.timeout(300)
def test_compressed_bombs_are_refused_within_bounded_memory(tmp_path: Path) -> None:
    shapes = _torch_shapes("efficientnet_lite0")
    # The model's own names and shapes, but three storages (each viewed by a real tensor) claim
    # 3.4 GB of zeros apiece: only the inflation bound can refuse this one.
    posing = {name: (int(np.prod(shape)), shape) for name, shape in shapes.items()}
    for name in list(posing)[:3]:
        posing[name] = (HUGE_ENTRY // 4, posing[name][1])
    right_names = tmp_path / "posing.pth"
    right_names.write_bytes(_checkpoint(posing, huge=3))
    # Names the model does not have: refused by the name check before any data is read.
    wrong_names = tmp_path / "wrong.pth"
    wrong_names.write_bytes(_checkpoint(
        {f"evil.{i}": (HUGE_ENTRY // 4, (HUGE_ENTRY // 4,)) for i in range(3)}, huge=3))
    for path in (right_names, wrong_names):
        assert path.stat().st_size < 11 * MIB
    cases = [("model", str(right_names)), ("model", str(wrong_names)),
             ("plain", str(wrong_names))]
    child = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cases)],
                           capture_output=True, text=True, timeout=280, check=False)
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout.strip().splitlines()[-1])
    print(results)
    posing_result, wrong_result, plain_result = results
    assert posing_result["outcome"].startswith("CheckpointError")
    assert "compressed" in posing_result["outcome"]
    assert "posing.pth" in posing_result["outcome"]
    assert wrong_result["outcome"].startswith("ConversionError")
    assert "unexpected keys (3): evil.0" in wrong_result["outcome"]
    assert plain_result["outcome"].startswith("CheckpointError")
    assert "compressed" in plain_result["outcome"]
    for result in results:
        assert result["peak_growth_mib"] < 200, result
        assert result["seconds"] < 20, result
