"""GoogLeNet: every endpoint against torchvision's own implementation, offline.

torchvision's GoogLeNet is built with random weights exactly as its pretrained weights are used
(``aux_logits=True, transform_input=True``), its batch norms get random, non-trivial statistics,
its state dict goes through ``torch.save`` and back through jaxdream's torch-free reader and the
strict converter, and both networks then see the same random image. The endpoint-table and
converter checks need no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdream.errors import ConversionError
from jaxdream.models import googlenet
from jaxdream.models.checkpoint import load_state_dict
from jaxdream.models.convert import load_state_dict_into

#: max|ours - ref| <= TOLERANCE * max(1, max|ref|), per endpoint. Fixed: a failure is a bug.
TOLERANCE = 1e-4
#: 224 is the training size; 171 x 229 gives odd sides at every stage, so ceil-mode pooling
#: keeps windows that hang over the edge.
SIZES = [(224, 224), (171, 229)]
BATCH = 1


def _abstract_model() -> nnx.Module:
    return nnx.eval_shape(lambda: googlenet.build(nnx.Rngs(0)))


def _forward(module: nnx.Module) -> Callable[..., dict[str, jax.Array]]:
    graphdef, state = nnx.split(module)
    run = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return lambda x: run(state, x)


def _random_pixels(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (BATCH, height, width, 3)).astype(np.float32)


def _normalised_nchw(pixels: np.ndarray) -> np.ndarray:
    """What a torchvision user feeds the model: (x / 255 - mean) / std, NCHW."""
    mean = np.asarray(googlenet.IMAGENET_MEAN, np.float32)
    std = np.asarray(googlenet.IMAGENET_STD, np.float32)
    return np.ascontiguousarray(((pixels / 255.0 - mean) / std).transpose(0, 3, 1, 2))


@pytest.fixture(scope="module")
def torchvision() -> Any:
    return pytest.importorskip("torchvision",
                               reason="torchvision not installed: parity with torchvision skipped")


@pytest.fixture(scope="module")
def reference(torchvision: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """torchvision's GoogLeNet in eval mode with random BN statistics, and its saved weights."""
    import torch

    torch.manual_seed(0)
    net = torchvision.models.googlenet(weights=None, aux_logits=True, transform_input=True,
                                       init_weights=True)
    batch_norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    # Calibrate first: with init_weights' std-0.01 convolutions and unit statistics the
    # activations shrink ~4x per layer and the deep endpoints would be ~0, so the comparison
    # would test nothing. Measuring real batch statistics keeps every layer at O(1); the
    # perturbation after that makes every BN tensor random and far from the identity.
    for bn in batch_norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: after one batch, exactly its statistics
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(_normalised_nchw(_random_pixels(224, 224, seed=99))))
        for bn in batch_norms:
            n = bn.num_features
            bn.weight.copy_(torch.empty(n).uniform_(0.5, 1.5))
            bn.bias.copy_(torch.empty(n).normal_(0.0, 0.3))
            bn.running_mean.add_(torch.empty(n).normal_(0.0, 0.3) * bn.running_var.sqrt())
            bn.running_var.mul_(torch.empty(n).uniform_(0.5, 2.0))
    net.eval()
    path = tmp_path_factory.mktemp("googlenet") / "googlenet-random.pth"
    torch.save(net.state_dict(), path)  # zip format, as torchvision's downloads
    return net, path


@pytest.fixture(scope="module")
def state_dict(reference: tuple[Any, Path]) -> Mapping[str, np.ndarray]:
    return load_state_dict(reference[1])


@pytest.fixture(scope="module")
def converted(state_dict: Mapping[str, np.ndarray]) -> Callable[..., dict[str, jax.Array]]:
    module = _abstract_model()
    load_state_dict_into(module, state_dict, googlenet.key_map(), ignore=googlenet.ignored_key)
    return _forward(module)


def _torch_endpoints(net: Any, normalised: np.ndarray) -> dict[str, np.ndarray]:
    """Every endpoint of torchvision's forward pass, via forward hooks, in NHWC."""
    import torch

    captured: dict[str, np.ndarray] = {}
    handles = []
    for name in googlenet.ENDPOINTS:
        if name == "logits":
            continue

        def hook(module: Any, args: Any, output: Any, name: str = name) -> None:
            captured[name] = output.detach().numpy().transpose(0, 2, 3, 1).copy()

        handles.append(getattr(net, name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            captured["logits"] = net(torch.from_numpy(normalised)).numpy().copy()
    finally:
        for handle in handles:
            handle.remove()
    return captured


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_every_endpoint_matches_torchvision(reference: tuple[Any, Path],
                                            converted: Callable[..., dict[str, jax.Array]],
                                            height: int, width: int) -> None:
    net, _ = reference
    pixels = _random_pixels(height, width, seed=height)
    expected = _torch_endpoints(net, _normalised_nchw(pixels))
    ours = {name: np.asarray(value) for name, value in converted(jnp.asarray(pixels)).items()}
    # (jit returns dicts with sorted keys, so compare names as sets)
    assert set(ours) == set(googlenet.ENDPOINTS) == set(expected)

    failures, report = [], []
    for name, ref in expected.items():
        assert ours[name].shape == ref.shape, (name, ours[name].shape, ref.shape)
        # A near-zero endpoint would make the comparison vacuous (see the calibration above).
        assert float(np.std(ref)) > 0.05, f"{name}: reference activations are degenerate"
        scale = max(1.0, float(np.max(np.abs(ref))))
        error = float(np.max(np.abs(ours[name] - ref))) / scale
        report.append(f"{name}={error:.2e}")
        if error > TOLERANCE:
            failures.append(f"{name}: max error {error:.3e} x max(1, max|ref|) = {scale:.3g}")
    print(f"\n{height}x{width} relative errors: " + " ".join(report))
    assert not failures, "\n".join(failures)


def test_weights_constants_match_torchvision(torchvision: Any) -> None:
    official = torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1
    url, sha_prefix = googlenet.OFFICIAL_WEIGHTS
    assert url == official.url
    assert url.endswith(f"-{sha_prefix}.pth")


def test_ignore_rule_is_explicit(state_dict: Mapping[str, np.ndarray]) -> None:
    ignored = sorted(k for k in state_dict if googlenet.ignored_key(k))
    assert any(k.startswith("aux1.") for k in ignored)
    assert any(k.startswith("aux2.") for k in ignored)
    assert all(k.startswith(("aux1.", "aux2.")) or k.endswith(".num_batches_tracked")
               for k in ignored)
    mapped = {key for _, key, _ in googlenet.key_map()}
    assert mapped.isdisjoint(ignored)
    assert mapped | set(ignored) == set(state_dict)


def _synthetic_state_dict() -> dict[str, np.ndarray]:
    """A torch-free state dict in torchvision's naming and shapes (values irrelevant), with the
    entries the real checkpoint also carries: a BN counter and the auxiliary heads."""
    leaves = {tuple(path): var for path, var in nnx.to_flat_state(nnx.state(_abstract_model()))}
    state: dict[str, np.ndarray] = {}
    for target, key, transpose in googlenet.key_map():
        shape = leaves[target].get_value().shape
        if transpose is not None:
            shape = tuple(shape[i] for i in np.argsort(transpose))
        state[key] = np.zeros(shape, np.float32)
    state["conv1.bn.num_batches_tracked"] = np.zeros((), np.int64)
    state["aux1.conv.conv.weight"] = np.zeros((128, 512, 1, 1), np.float32)
    state["aux2.fc2.bias"] = np.zeros((1000,), np.float32)
    return state


def test_strict_converter_rejects_missing_and_misshaped_keys() -> None:
    key_map, ignore = googlenet.key_map(), googlenet.ignored_key
    good = _synthetic_state_dict()
    load_state_dict_into(_abstract_model(), good, key_map, ignore=ignore)  # the control
    missing = {k: v for k, v in good.items() if k != "inception4c.branch3.1.bn.running_var"}
    with pytest.raises(ConversionError, match=r"missing keys \(1\): inception4c\.branch3\.1"):
        load_state_dict_into(_abstract_model(), missing, key_map, ignore=ignore)
    # A 5x5 "branch3" kernel, as the paper has it, is exactly what must not load silently.
    wrong = dict(good)
    wrong["inception4c.branch3.1.conv.weight"] = np.zeros((64, 24, 5, 5), np.float32)
    with pytest.raises(ConversionError, match=r"mis-shaped keys \(1\): inception4c\.branch3\.1"):
        load_state_dict_into(_abstract_model(), wrong, key_map, ignore=ignore)
    extra = dict(good)
    extra["aux3.fc.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ConversionError, match=r"unexpected keys \(1\): aux3\.fc\.weight"):
        load_state_dict_into(_abstract_model(), extra, key_map, ignore=ignore)


def test_endpoint_table_matches_output_shapes() -> None:
    table = googlenet.endpoint_table()
    assert tuple(table) == googlenet.ENDPOINTS
    assert googlenet.DEFAULT_LAYERS in table
    assert table["inception4c"] == (512, 16) and table["inception5b"] == (1024, 32)
    assert table["logits"] == (1000, 0)
    graphdef, state = nnx.split(_abstract_model())
    for height, width in SIZES:
        out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                             jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32))
        assert set(out) == set(table)
        for name, (channels, stride) in table.items():
            shape = out[name].shape
            if stride == 0:
                assert shape == (1, channels), name
                continue
            assert shape[0] == 1 and shape[3] == channels, name
            if height % 32 == 0 and width % 32 == 0:
                assert shape[1:3] == (height // stride, width // stride), name
            else:
                # Ceil-mode pooling can lose the last, partial window: one pixel at most.
                for got, side in zip(shape[1:3], (height, width), strict=True):
                    assert math.ceil(side / stride) - 1 <= got <= math.ceil(side / stride), name


def test_forward_stops_at_deepest_requested_endpoint() -> None:
    graphdef, state = nnx.split(_abstract_model())
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)

    def equations(endpoints: list[str]) -> int:
        jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x, endpoints))(state, x)
        return len(jaxpr.eqns)

    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, ["inception4c", "conv1"]),
                         state, x)
    assert set(out) == {"conv1", "inception4c"}
    assert equations(["conv1"]) < equations(["inception4c"]) < equations(["logits"])
    with pytest.raises(KeyError, match="inception6a"):
        jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, ["inception6a"]), state, x)
