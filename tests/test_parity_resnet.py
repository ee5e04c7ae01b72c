"""ResNet-50 against torchvision itself: same checkpoint, same images, every endpoint.

Offline: torchvision's ``resnet50(weights=None)`` gets random convolution weights from its own
initialiser and random batch-norm parameters and statistics from this file, is saved with
``torch.save`` (zip format), read back by jaxdream's torch-free reader and converted strictly.
Skipped (and so failed in CI) when torchvision is not installed.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdream.errors import ConversionError
from jaxdream.models import layers as L
from jaxdream.models import resnet
from jaxdream.models.checkpoint import load_state_dict
from jaxdream.models.convert import load_state_dict_into

#: max|ours - ref| <= RTOL * max(1, max|ref|), per endpoint. Fixed: a failure is a bug.
RTOL = 1e-4
#: (batch, height, width): one image at the classic size, two at an odd one.
SIZES = [(1, 224, 224), (2, 150, 199)]


@pytest.fixture(scope="module")
def torchvision() -> ModuleType:
    return pytest.importorskip("torchvision",
                               reason="torchvision not installed: parity with torchvision skipped")


def _randomise_batch_norms(torch: Any, net: Any, seed: int) -> None:
    """Random BN weight/bias, then statistics that keep activations at a sane scale.

    Statistics are first measured on random images (train mode, cumulative average), so that
    eval-mode activations neither explode nor vanish over 16 residual blocks, then perturbed per
    channel so that no BN is near the identity: variances scaled by 0.5..2 (still positive),
    means shifted by up to about a standard deviation. The conversion of all four tensors is
    thereby exercised, and a relative tolerance stays meaningful.
    """
    rng = np.random.default_rng(seed)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    def tensor(value: np.ndarray) -> Any:
        return torch.from_numpy(value.astype(np.float32))

    with torch.no_grad():
        for bn in bns:
            n = bn.num_features
            bn.weight.copy_(tensor(rng.uniform(0.5, 1.5, n)))
            bn.bias.copy_(tensor(rng.normal(0.0, 0.2, n)))
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration batch
        net.train()
        generator = torch.Generator().manual_seed(seed)
        net(torch.randn(4, 3, 96, 96, generator=generator))
        net.eval()
        for bn in bns:
            n = bn.num_features
            std = bn.running_var.sqrt()
            bn.running_mean.add_(tensor(rng.normal(0.0, 0.5, n)) * std)
            bn.running_var.mul_(tensor(rng.uniform(0.5, 2.0, n)))
            bn.momentum = 0.1


@pytest.fixture(scope="module")
def checkpoint(torchvision: ModuleType, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[Any, Path]:
    import torch

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None).eval()
    _randomise_batch_norms(torch, net, seed=0)
    path = tmp_path_factory.mktemp("resnet") / "resnet50_random.pth"
    torch.save(net.state_dict(), path)  # zip format, as torchvision's downloads
    return net, path


@pytest.fixture(scope="module")
def converted(checkpoint: tuple[Any, Path]) -> nnx.Module:
    _, path = checkpoint
    module = nnx.eval_shape(lambda: resnet.build(nnx.Rngs(0)))
    load_state_dict_into(module, load_state_dict(path), resnet.key_map(),
                         ignore=resnet.ignored_key, source=str(path))
    return module


def _torch_endpoints(torch: Any, net: Any, images_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """torchvision's activations at the names of our endpoints, via forward hooks, NHWC."""
    captured: dict[str, np.ndarray] = {}
    watched: list[tuple[str, Any]] = [("conv1", net.relu), ("maxpool", net.maxpool)]
    for s in range(1, 5):
        stage = getattr(net, f"layer{s}")
        watched += [(f"layer{s}.{b}", block) for b, block in enumerate(stage)]
        watched.append((f"layer{s}", stage))
    watched.append(("logits", net.fc))

    def hook(name: str) -> Any:
        def record(module: Any, inputs: Any, output: Any) -> None:
            assert name not in captured, f"{name} hooked twice"
            array = output.detach().numpy().copy()
            captured[name] = array.transpose(0, 2, 3, 1) if array.ndim == 4 else array
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in watched]
    try:
        pixels = torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())
        mean = torch.tensor(resnet.IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(resnet.IMAGENET_STD).view(1, 3, 1, 1)
        with torch.no_grad():
            net((pixels / 255.0 - mean) / std)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@pytest.fixture(scope="module")
def forward(converted: nnx.Module) -> Any:
    graphdef, state = nnx.split(converted)
    run = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return lambda x: run(state, x)


@pytest.mark.parametrize(("batch", "height", "width"), SIZES)
def test_every_endpoint_matches_torchvision(checkpoint: tuple[Any, Path], forward: Any,
                                            batch: int, height: int, width: int) -> None:
    import torch

    net, _ = checkpoint
    images = np.random.default_rng(height).uniform(0, 255, (batch, height, width, 3))
    images = images.astype(np.float32)
    reference = _torch_endpoints(torch, net, images)
    ours = forward(jnp.asarray(images))  # a dict through jit: keys come back sorted
    assert set(ours) == set(reference) == set(resnet.endpoint_table())
    errors = {}
    for name, ref in reference.items():
        got = np.asarray(ours[name])
        assert got.shape == ref.shape, name
        scale = max(1.0, float(np.abs(ref).max()))
        errors[name] = float(np.abs(got - ref).max()) / scale
    print(f"\n{height}x{width} max relative error per endpoint: "
          + ", ".join(f"{k}={v:.1e}" for k, v in errors.items()))
    bad = {k: v for k, v in errors.items() if not v <= RTOL}
    assert not bad, f"endpoints beyond {RTOL}: {bad}"
    # The network's output is not degenerate: classes differ, activations are O(1) and up.
    assert np.ptp(reference["logits"]) > 0.1
    assert 1.0 < np.abs(reference["layer4"]).max() < 1e3


def test_forward_stops_at_deepest_request_and_alias_is_the_last_block(
        converted: nnx.Module) -> None:
    x = jnp.zeros((1, 64, 64, 3))
    out = jax.eval_shape(lambda x: converted(x, ["layer2"]), x)
    assert set(out) == {"layer2"}
    both = jax.jit(lambda x: converted(x, ["layer1", "layer1.2"]))(
        jnp.full((1, 32, 32, 3), 100.0))
    assert set(both) == {"layer1.2", "layer1"}
    np.testing.assert_array_equal(both["layer1"], both["layer1.2"])
    with pytest.raises(KeyError, match="layer5"):
        converted(x, ["layer5"])

    # Nothing past the deepest request is traced: no fc matmul when layer1 is the deepest.
    jaxpr = str(jax.make_jaxpr(lambda x: converted(x, ["maxpool", "layer1"]))(x))
    assert "dot_general" in jaxpr
    assert "512]" not in jaxpr and "2048" not in jaxpr  # layer2's channels, fc's inputs


def test_endpoint_table_matches_output_shapes() -> None:
    """Shapes only, so no torchvision needed: the model is built and run abstractly."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: resnet.build(nnx.Rngs(0))))
    table = resnet.endpoint_table()
    names = ["conv1", "maxpool"]
    for s, blocks in enumerate((3, 4, 6, 3), 1):
        names += [f"layer{s}.{b}" for b in range(blocks)] + [f"layer{s}"]
    assert list(table) == names + ["logits"]
    assert table["conv1"] == (64, 2) and table["maxpool"] == (64, 4)
    assert table["layer1"] == (256, 4) and table["layer2"] == (512, 8)
    assert table["layer3"] == (1024, 16) and table["layer4"] == (2048, 32)
    assert resnet.DEFAULT_LAYERS in table
    for height, width in [(224, 224), (150, 199), (33, 47)]:
        out = jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x), state,
                             jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32))
        assert set(out) == set(table)
        for name, (channels, stride) in table.items():
            if stride:
                expected = (1, -(-height // stride), -(-width // stride), channels)
                assert out[name].shape == expected, (name, height, width)
        assert out["logits"].shape == (1, 1000)


@pytest.mark.parametrize(("height", "width"), [(56, 56), (28, 28), (15, 20), (7, 9)])
def test_strided_1x1_shortcut_equals_a_stride_2_convolution(height: int, width: int) -> None:
    rng = np.random.default_rng(height)
    x = jnp.asarray(rng.normal(size=(2, height, width, 32)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 32, 48)), jnp.float32)
    strided = jax.lax.conv_general_dilated(x, k, (2, 2), ((0, 0), (0, 0)),
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
    sliced = L.conv2d(x[:, ::2, ::2], k, 1, padding=((0, 0), (0, 0)))
    assert sliced.shape == strided.shape
    # The same products summed (XLA may order the sum differently: rounding only).
    np.testing.assert_allclose(sliced, strided, rtol=1e-6, atol=1e-5)


def test_key_map_covers_the_torchvision_state_dict(checkpoint: tuple[Any, Path]) -> None:
    net, _ = checkpoint
    keys = list(net.state_dict())
    mapped = [key for _, key, _ in resnet.key_map()]
    assert len(mapped) == len(set(mapped))
    assert sorted(mapped) == sorted(k for k in keys if not resnet.ignored_key(k))
    assert sum(k.endswith("num_batches_tracked") for k in keys) == 53
    assert not resnet.ignored_key("layer1.0.bn1.running_var")


def test_strict_conversion_rejects_missing_and_misshaped_keys(
        checkpoint: tuple[Any, Path]) -> None:
    _, path = checkpoint
    state_dict = load_state_dict(path)

    def convert(sd: dict[str, np.ndarray]) -> None:
        module = nnx.eval_shape(lambda: resnet.build(nnx.Rngs(0)))
        load_state_dict_into(module, sd, resnet.key_map(), ignore=resnet.ignored_key)

    missing = dict(state_dict)
    del missing["layer3.0.downsample.1.running_var"]
    with pytest.raises(ConversionError, match=r"missing keys \(1\): "
                                              r"layer3\.0\.downsample\.1\.running_var"):
        convert(missing)

    misshaped = dict(state_dict)
    misshaped["layer2.1.conv2.weight"] = np.zeros((128, 128, 1, 3), np.float32)
    with pytest.raises(ConversionError, match=r"mis-shaped keys.*layer2\.1\.conv2\.weight"):
        convert(misshaped)

    extra = dict(state_dict)
    extra["layer4.0.bn4.weight"] = np.ones((2048,), np.float32)
    with pytest.raises(ConversionError, match=r"unexpected keys.*layer4\.0\.bn4\.weight"):
        convert(extra)


def test_official_weights_are_torchvisions_imagenet1k_v1(torchvision: ModuleType) -> None:
    url, prefix = resnet.OFFICIAL_WEIGHTS
    assert torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url == url
    assert url.endswith(f"-{prefix}.pth")
