"""VGG16 against torchvision itself: every endpoint and the logits, offline, random weights.

torchvision's ``vgg16(weights=None)``, with random weights and non-zero random biases, is saved
with ``torch.save`` and read back by jaxdream's own torch-free reader, then loaded strictly into
the Flax model. torchvision's intermediates come from forward hooks on the ReLU / MaxPool /
Linear modules that match each endpoint.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdream.errors import ConversionError
from jaxdream.models import vgg
from jaxdream.models.checkpoint import load_state_dict
from jaxdream.models.convert import load_state_dict_into

#: max|ours - torchvision| <= TOLERANCE * max(1, max|torchvision|), per endpoint. Never loosen:
#: VGG is a plain stack of convolutions, so a bigger gap means a real difference.
TOLERANCE = 1e-5

#: (batch, height, width): ImageNet's size, where the adaptive pool is the identity and the
#: flatten order before fc6 is exercised on a full 7x7 map, and an odd size whose pool5 is 3x4,
#: so the adaptive pool has to replicate and average overlapping bins.
SIZES = ((1, 224, 224), (2, 100, 133))


def _torch_module_for(model: Any) -> dict[str, Any]:
    """Endpoint name -> the torchvision module whose output is that endpoint."""
    features, classifier = model.features, model.classifier
    table: dict[str, Any] = {}
    for name, index, channels in vgg._layers():
        # A conv endpoint is after its ReLU, which follows the conv in ``features``.
        table[name] = features[index + 1] if channels is not None else features[index]
    table["fc6"], table["fc7"], table["logits"] = classifier[1], classifier[4], classifier[6]
    return table


@pytest.fixture(scope="module")
def torchvision() -> ModuleType:
    return pytest.importorskip("torchvision",
                               reason="torchvision not installed: parity with torchvision skipped")


@dataclasses.dataclass
class Pair:
    torch_model: Any
    state_dict: dict[str, np.ndarray]
    module: nnx.Module


@pytest.fixture(scope="module")
def pair(torchvision: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    import torch

    # Built on the meta device and filled once here: torchvision's own initialisation of 138 M
    # parameters would cost seconds only to be overwritten. Biases get random values too (its
    # init zeroes them, which would leave bias conversion untested), and every weight is
    # He-scaled so that activations stay O(1) through fc7 and the logits (torchvision's
    # N(0, 0.01) for linear layers would shrink them below 1, where the tolerance turns absolute).
    with torch.device("meta"):
        model = torchvision.models.vgg16(weights=None)
    model = model.to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = layer.weight[0].numel()
                layer.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
                layer.bias.normal_(0.0, 0.1, generator=generator)
    assert all(p.device.type == "cpu" for p in model.parameters())
    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.save(model.state_dict(), path)  # zip format, like torchvision's downloads
    state_dict = load_state_dict(path)
    path.unlink()  # 528 MiB
    module = nnx.eval_shape(lambda: vgg.build(nnx.Rngs(0)))
    load_state_dict_into(module, state_dict, vgg.key_map(), ignore=vgg.ignored_key)
    return Pair(model, state_dict, module)


def _torchvision_endpoints(torchvision: ModuleType, model: Any, pixels: np.ndarray
                           ) -> dict[str, np.ndarray]:
    import torch

    captured: dict[str, np.ndarray] = {}
    handles = []
    for name, layer in _torch_module_for(model).items():
        def hook(_layer: Any, _inputs: Any, output: Any, name: str = name) -> None:
            captured[name] = output.detach().numpy().copy()  # ReLUs there work in place
        handles.append(layer.register_forward_hook(hook))
    try:
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255.0
        mean = torch.tensor(vgg.IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(vgg.IMAGENET_STD).view(1, 3, 1, 1)
        with torch.no_grad():
            logits = model((x - mean) / std)
    finally:
        for handle in handles:
            handle.remove()
    np.testing.assert_array_equal(captured["logits"], logits.numpy())
    # NCHW -> NHWC, to compare with ours.
    return {name: np.transpose(v, (0, 2, 3, 1)) if v.ndim == 4 else v
            for name, v in captured.items()}


@pytest.fixture(scope="module")
def forward(pair: Pair) -> Any:
    graphdef, state = nnx.split(pair.module)
    # The parameters are an argument, not closed-over constants baked into the program.
    apply = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return lambda x: apply(state, x)


@pytest.mark.parametrize(("batch", "height", "width"), SIZES)
def test_every_endpoint_matches_torchvision(torchvision: ModuleType, pair: Pair, forward: Any,
                                            batch: int, height: int, width: int) -> None:
    pixels = np.random.default_rng(height).uniform(0, 255, (batch, height, width, 3)).astype(
        np.float32)
    ref = _torchvision_endpoints(torchvision, pair.torch_model, pixels)
    ours = {k: np.asarray(v) for k, v in forward(jnp.asarray(pixels)).items()}
    # Dicts come back from jit with sorted keys, so compare names as sets.
    assert set(ours) == set(vgg.ENDPOINTS) == set(ref)
    report = []
    failed = []
    for name in vgg.ENDPOINTS:
        assert ours[name].shape == ref[name].shape, name
        scale = max(1.0, float(np.max(np.abs(ref[name]))))
        relative = float(np.max(np.abs(ours[name] - ref[name]))) / scale
        report.append(f"{name}: {relative:.2e} (scale {scale:.3g})")
        if not relative <= TOLERANCE:
            failed.append(name)
    print(f"\n{batch}x{height}x{width} max|ours - ref| / max(1, max|ref|):\n  "
          + "\n  ".join(report))
    assert not failed, f"beyond {TOLERANCE} relative: {failed}\n" + "\n".join(report)
    # Random weights must still give a non-degenerate network, or the comparison is empty.
    assert float(np.max(ref["conv5_3"])) > 0 and float(np.std(ref["logits"])) > 0


def test_endpoint_table_matches_output_shapes() -> None:
    module = nnx.eval_shape(lambda: vgg.build(nnx.Rngs(0)))
    table = vgg.endpoint_table()
    assert list(table) == list(vgg.ENDPOINTS)
    assert table["conv1_1"] == (64, 1) and table["pool1"] == (64, 2)
    assert table["conv4_3"] == (512, 8) and table["pool5"] == (512, 32)
    assert table["fc6"] == (4096, 0) and table["logits"] == (1000, 0)
    assert vgg.DEFAULT_LAYERS in table
    for height, width in ((224, 224), (100, 133), (37, 45)):
        x = jax.ShapeDtypeStruct((2, height, width, 3), jnp.float32)
        out = nnx.eval_shape(lambda m, x: m(x), module, x)
        assert set(out) == set(table)
        for name, (channels, stride) in table.items():
            if stride:
                # Pools floor odd sizes, as torchvision's MaxPool2d(2, 2) does.
                assert out[name].shape == (2, height // stride, width // stride, channels), name
            else:
                assert out[name].shape == (2, channels), name


def test_forward_stops_at_the_deepest_requested_endpoint() -> None:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: vgg.build(nnx.Rngs(0))))
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)

    def ops(endpoints: list[str]) -> tuple[int, int]:
        jaxpr = str(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x, endpoints))(state, x))
        return jaxpr.count("conv_general_dilated"), jaxpr.count("dot_general")

    assert ops(["conv1_1"]) == (1, 0)
    assert ops(["conv4_3"]) == (10, 0)
    assert ops(["conv4_3", "pool1"]) == ops(["conv4_3"])
    assert ops(["pool5"]) == (13, 0)
    assert ops(["fc6"]) == (13, 1)
    assert ops(["logits"]) == (13, 3)
    module = nnx.merge(graphdef, state)
    with pytest.raises(KeyError, match="conv5_4"):
        module(jnp.zeros((1, 32, 32, 3)), ["conv5_4"])


def test_key_map_fits_torchvisions_state_dict(pair: Pair) -> None:
    keys = [key for _, key, _ in vgg.key_map()]
    assert len(keys) == len(set(keys)) == len(pair.state_dict) == 32
    assert set(keys) == set(pair.state_dict)
    assert not any(vgg.ignored_key(key) for key in pair.state_dict)
    # OIHW (64, 3, 3, 3) -> HWIO (3, 3, 3, 64): element [o, i, h, w] lands at [h, w, i, o].
    kernel = np.asarray(pair.module.convs[0].kernel.get_value())  # type: ignore[attr-defined]
    assert kernel[2, 0, 1, 5] == pair.state_dict["features.0.weight"][5, 1, 2, 0]
    bias = np.asarray(pair.module.convs[12].bias.get_value())  # type: ignore[attr-defined]
    np.testing.assert_array_equal(bias, pair.state_dict["features.28.bias"])
    assert np.any(bias != 0)
    for _, var in nnx.to_flat_state(nnx.state(pair.module)):
        assert isinstance(var.get_value(), jax.Array), "a leaf was left abstract"


def test_strict_conversion_rejects_missing_and_mis_shaped_keys(pair: Pair) -> None:
    state_dict: dict[str, np.ndarray] = dict(pair.state_dict)  # shallow: shares the arrays
    del state_dict["features.28.bias"]
    state_dict["features.0.weight"] = np.zeros((64, 3, 5, 5), np.float32)
    # A classifier for a 6x6 pooled map (AlexNet's) must not slip into fc6.
    state_dict["classifier.0.weight"] = np.broadcast_to(np.float32(0), (4096, 512 * 6 * 6))
    state_dict["features.30.weight"] = np.zeros((1,), np.float32)
    module = nnx.eval_shape(lambda: vgg.build(nnx.Rngs(0)))
    with pytest.raises(ConversionError) as error:
        load_state_dict_into(module, state_dict, vgg.key_map(), ignore=vgg.ignored_key)
    message = str(error.value)
    assert "missing keys (1): features.28.bias" in message
    assert "unexpected keys (1): features.30.weight" in message
    assert "features.0.weight is (64, 3, 5, 5), expected (64, 3, 3, 3)" in message
    assert "classifier.0.weight is (4096, 18432), expected (4096, 25088)" in message


def test_official_weights_are_torchvisions(torchvision: ModuleType) -> None:
    weights = torchvision.models.VGG16_Weights.IMAGENET1K_V1
    url, prefix = vgg.OFFICIAL_WEIGHTS
    assert weights.url == url and url.endswith(f"-{prefix}.pth")
