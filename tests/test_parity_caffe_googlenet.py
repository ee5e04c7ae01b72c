"""Caffe's GoogLeNet: every endpoint against an independent PyTorch transcription of
``models/bvlc_googlenet/deploy.prototxt``, its weights written as .caffemodel files (both of
Caffe's layouts) and as neural-dream's .pth, all offline and with random weights.

The reference below is written from the prototxt alone, with PyTorch's own layers
(``conv2d``, ``max_pool2d(ceil_mode=True)``, ``local_response_norm``, ``avg_pool2d``): it shares
no code with jaxdream's model. Endpoint semantics follow Caffe's ``net.forward(end=name)`` as the
original notebook used it: a convolution's endpoint is taken before its in-place ReLU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import caffefmt as cf
from jaxdream.errors import CheckpointError, ConfigError, ConversionError
from jaxdream.models import MODELS, caffe_googlenet, load_model

torch = pytest.importorskip("torch", reason="torch not installed: Caffe GoogLeNet parity skipped")
F = torch.nn.functional

#: max|ours - ref| <= TOLERANCE * max(1, max|ref|), per endpoint. Fixed: a failure is a bug.
TOLERANCE = 1e-4
#: 224: the deploy size (pool5 is 1x1, Caffe's classifier exactly). 171 x 229: odd sides at
#: every ceil-mode pool and a pool5 input under 7 (pooled whole). 250 x 331: pool5 2 x 4.
SIZES = [(224, 224), (171, 229), (250, 331)]
MEAN = (104.0, 116.0, 122.0)

# ------------------------------------------------------------------ the reference, from the prototxt

reference_shapes = cf.googlenet_shapes
random_params = cf.googlenet_params
INCEPTION = cf.INCEPTION


def reference_forward(params: dict[str, list[np.ndarray]], pixels_rgb: np.ndarray
                      ) -> dict[str, np.ndarray]:
    """The prototxt layer by layer (NCHW); returns every blob as NHWC numpy."""
    pads = {name: pad for name, (_, pad) in reference_shapes(
        params["loss3/classifier"][0].shape[0]).items()}
    t = {k: [torch.from_numpy(a) for a in v] for k, v in params.items()}
    bgr = pixels_rgb[..., ::-1] - np.asarray(MEAN, np.float32)
    blobs: dict[str, Any] = {}

    def conv(name: str, x: Any, stride: int = 1) -> Any:
        blobs[name] = F.conv2d(x, t[name][0], t[name][1], stride=stride, padding=pads[name])
        return F.relu(blobs[name])  # in-place ReLU in Caffe: the blob seen by later layers

    def pool(name: str, x: Any, stride: int, pad: int = 0) -> Any:
        blobs[name] = F.max_pool2d(x, 3, stride, pad, ceil_mode=True)
        return blobs[name]

    def lrn(name: str, x: Any) -> Any:
        blobs[name] = F.local_response_norm(x, size=5, alpha=1e-4, beta=0.75, k=1.0)
        return blobs[name]

    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(bgr.transpose(0, 3, 1, 2)))
        x = conv("conv1/7x7_s2", x, stride=2)
        x = lrn("pool1/norm1", pool("pool1/3x3_s2", x, 2))
        x = conv("conv2/3x3", conv("conv2/3x3_reduce", x))
        x = pool("pool2/3x3_s2", lrn("conv2/norm2", x), 2)
        for block in INCEPTION:
            if block in ("4a", "5a"):
                x = pool(f"pool{int(block[0]) - 1}/3x3_s2", x, 2)
            p = f"inception_{block}/"
            branches = [conv(p + "1x1", x),
                        conv(p + "3x3", conv(p + "3x3_reduce", x)),
                        conv(p + "5x5", conv(p + "5x5_reduce", x)),
                        conv(p + "pool_proj", pool(p + "pool", x, 1, 1))]
            x = blobs[p + "output"] = torch.cat(branches, 1)
        window = (min(7, x.shape[2]), min(7, x.shape[3]))
        x = blobs["pool5/7x7_s1"] = F.avg_pool2d(x, window, 1)
        weight, bias = t["loss3/classifier"]
        # One score per 7x7 window, averaged (at 224 exactly Caffe's single InnerProduct).
        scores = torch.einsum("nchw,kc->nkhw", x, weight) + bias[:, None, None]
        blobs["loss3/classifier"] = scores.mean(dim=(2, 3))
    return {name: (v.numpy().transpose(0, 2, 3, 1) if v.ndim == 4 else v.numpy())
            for name, v in blobs.items()}


# ------------------------------------------------------------------------------ weights files


def neural_dream_state(params: dict[str, list[np.ndarray]], classes: int) -> dict[str, Any]:
    """A state dict as neural-dream's bvlc_googlenet.pth holds it: ``/`` as ``_``, the
    auxiliary heads (loss1_*, loss2_*), and no loss3 classifier."""
    state = {}
    for name, (weight, bias) in params.items():
        if name != "loss3/classifier":
            state[name.replace("/", "_") + ".weight"] = torch.from_numpy(weight)
            state[name.replace("/", "_") + ".bias"] = torch.from_numpy(bias)
    for head, cin in (("loss1", 512), ("loss2", 528)):
        state[f"{head}_conv.weight"] = torch.zeros(128, cin, 1, 1)
        state[f"{head}_conv.bias"] = torch.zeros(128)
        state[f"{head}_fc_1.weight"] = torch.zeros(1024, 2048)
        state[f"{head}_fc_1.bias"] = torch.zeros(1024)
        state[f"{head}_classifier_1.weight"] = torch.zeros(classes, 1024)
        state[f"{head}_classifier_1.bias"] = torch.zeros(classes)
    return state


def with_aux_heads(params: dict[str, list[np.ndarray]], classes: int
                   ) -> dict[str, list[np.ndarray]]:
    """The Caffe file of a trained net also carries loss1/* and loss2/* (ignored)."""
    extra = {}
    for head, cin in (("loss1", 512), ("loss2", 528)):
        extra[f"{head}/conv"] = [np.zeros((128, cin, 1, 1), np.float32), np.zeros(128, np.float32)]
        extra[f"{head}/fc"] = [np.zeros((1024, 2048), np.float32), np.zeros(1024, np.float32)]
        extra[f"{head}/classifier"] = [np.zeros((classes, 1024), np.float32),
                                       np.zeros(classes, np.float32)]
    return {**params, **extra}


@pytest.fixture(scope="module")
def params() -> dict[str, list[np.ndarray]]:
    return random_params(seed=0)


@pytest.fixture(scope="module")
def files(params: dict[str, list[np.ndarray]], tmp_path_factory: pytest.TempPathFactory
          ) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("caffe")
    full = with_aux_heads(params, 1000)
    paths = {"v1": folder / "v1.caffemodel", "current": folder / "current.caffemodel",
             "pth": folder / "bvlc_googlenet.pth"}
    paths["v1"].write_bytes(cf.caffemodel(full, v1=True))
    paths["current"].write_bytes(cf.caffemodel(full, v1=False))
    torch.save(neural_dream_state(params, 1000), paths["pth"])
    return paths


def _forward(module: nnx.Module) -> Callable[..., dict[str, jax.Array]]:
    graphdef, state = nnx.split(module)
    run = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return lambda x: {k: np.asarray(v) for k, v in run(state, jnp.asarray(x)).items()}


def _relative_errors(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
    errors = {}
    for name, expected in ref.items():
        assert ours[name].shape == expected.shape, (name, ours[name].shape, expected.shape)
        assert float(np.std(expected)) > 1e-2, f"{name}: degenerate reference activations"
        scale = max(1.0, float(np.max(np.abs(expected))))
        errors[name] = float(np.max(np.abs(ours[name] - expected))) / scale
    return errors


@pytest.fixture(scope="module")
def from_v1(files: dict[str, Path]) -> Callable[..., dict[str, np.ndarray]]:
    return _forward(load_model("bvlc_googlenet", files["v1"]).module)


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_every_endpoint_matches_the_prototxt_reference(
        params: dict[str, list[np.ndarray]], from_v1: Callable[..., dict[str, np.ndarray]],
        height: int, width: int) -> None:
    pixels = np.random.default_rng(height).uniform(0, 255, (1, height, width, 3))
    pixels = pixels.astype(np.float32)
    ref = reference_forward(params, pixels)
    ours = from_v1(pixels)
    assert set(ours) == set(caffe_googlenet.ENDPOINTS) == set(ref)
    errors = _relative_errors(ours, ref)
    print(f"\n{height}x{width} worst: " + ", ".join(
        f"{k}={v:.1e}" for k, v in sorted(errors.items(), key=lambda kv: -kv[1])[:5]))
    bad = {k: v for k, v in errors.items() if v > TOLERANCE}
    assert not bad, bad


def test_both_caffe_layouts_and_neural_dreams_pth_load_the_same_weights(
        files: dict[str, Path], from_v1: Callable[..., dict[str, np.ndarray]]) -> None:
    pixels = np.random.default_rng(5).uniform(0, 255, (2, 96, 128, 3)).astype(np.float32)
    expected = from_v1(pixels)
    current = _forward(load_model("bvlc_googlenet", files["current"]).module)(pixels)
    for name in caffe_googlenet.ENDPOINTS:
        np.testing.assert_array_equal(current[name], expected[name])
    pth_model = load_model("bvlc_googlenet", files["pth"]).module
    graphdef, state = nnx.split(pth_model)
    without = [n for n in caffe_googlenet.ENDPOINTS if n != caffe_googlenet.CLASSIFIER]
    out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, without))(state, jnp.asarray(pixels))
    for name in without:
        np.testing.assert_array_equal(np.asarray(out[name]), expected[name])
    # neural-dream's files have no loss3/classifier: asking for it says so, in one line.
    with pytest.raises(ConfigError, match="carry no classifier.*caffemodel"):
        nnx.merge(graphdef, state)(jnp.asarray(pixels), [caffe_googlenet.CLASSIFIER])


def test_lrn_is_caffes_formula_transcribed_in_numpy() -> None:
    rng = np.random.default_rng(0)
    for channels in (3, 7, 64):
        x = rng.normal(0, 60, (2, 5, 4, channels)).astype(np.float64)
        expected = np.empty_like(x)
        # caffe/src/caffe/layers/lrn_layer.cpp (ACROSS_CHANNELS): scale = k + alpha/n * sum of
        # squares over channels [c - (n-1)/2, c + (n-1)/2] clipped to the blob; y = x scale^-b.
        n, alpha, beta, k = 5, 1e-4, 0.75, 1.0
        for c in range(channels):
            lo, hi = max(0, c - (n - 1) // 2), min(channels, c + (n - 1) // 2 + 1)
            scale = k + alpha / n * np.sum(x[..., lo:hi] ** 2, axis=-1)
            expected[..., c] = x[..., c] * scale ** -beta
        ours = np.asarray(caffe_googlenet.caffe_lrn(jnp.asarray(x, jnp.float32)))
        np.testing.assert_allclose(ours, expected, rtol=2e-6, atol=1e-5)
        # The data is large enough for the normalisation to act, differently per position.
        ratio = expected / np.where(x == 0, 1, x)
        assert ratio.min() < 0.9 and ratio.max() - ratio.min() > 0.05


def test_wrong_architecture_files_list_every_problem(tmp_path: Path,
                                                     params: dict[str, list[np.ndarray]]) -> None:
    broken = dict(params)
    del broken["inception_4c/5x5"]
    broken["inception_4d/5x5"] = [np.zeros((64, 32, 3, 3), np.float32), params[
        "inception_4d/5x5"][1]]  # torchvision's 3x3 "5x5" branch: must not load
    broken["fc8"] = [np.zeros((2, 2), np.float32), np.zeros(2, np.float32)]
    path = tmp_path / "broken.caffemodel"
    path.write_bytes(cf.caffemodel(broken, v1=True))
    with pytest.raises(ConversionError) as info:
        load_model("bvlc_googlenet", path)
    message = str(info.value)
    assert "missing keys (2): inception_4c/5x5.weight, inception_4c/5x5.bias" in message
    assert "mis-shaped keys (1): inception_4d/5x5.weight is (64, 32, 3, 3)" in message
    assert "unexpected keys (2): fc8.weight, fc8.bias" in message


def test_places_weights_are_refused_by_the_imagenet_model_and_fit_their_own(
        tmp_path: Path) -> None:
    places = random_params(seed=1, classes=205)
    path = tmp_path / "places.caffemodel"
    path.write_bytes(cf.caffemodel(with_aux_heads(places, 205)))
    with pytest.raises(ConversionError, match="205-class network.*bvlc_googlenet has 1000"):
        load_model("bvlc_googlenet", path)
    pth = tmp_path / "googlenet_places205.pth"
    torch.save(neural_dream_state(places, 205), pth)
    with pytest.raises(ConversionError, match="205-class network"):
        load_model("googlenet_places365", pth)
    model = load_model("googlenet_places205", path)
    assert model.module.config.mean_bgr == caffe_googlenet.PLACES205_MEAN_BGR
    assert model.spec.endpoints[caffe_googlenet.CLASSIFIER] == (205, 0)


def test_a_truncated_caffemodel_is_one_line_through_load_model(tmp_path: Path,
                                                                files: dict[str, Path]) -> None:
    path = tmp_path / "cut.caffemodel"
    path.write_bytes(files["v1"].read_bytes()[:100_000])
    with pytest.raises(CheckpointError) as info:
        load_model("bvlc_googlenet", path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_registry_entries() -> None:
    spec = MODELS["bvlc_googlenet"]
    assert spec.default_layers == "inception_4c/output"
    assert spec.endpoints["inception_4c/output"] == (512, 16)
    assert spec.endpoints["inception_3b/5x5_reduce"] == (32, 8)
    assert spec.weights.url == "http://dl.caffe.berkeleyvision.org/bvlc_googlenet.caffemodel"
    assert spec.weights.sha1 == "405fc5acd08a3bb12de8ee5e23a96bec22f08204"
    for name, classes in (("googlenet_places205", 205), ("googlenet_places365", 365)):
        assert MODELS[name].endpoints[caffe_googlenet.CLASSIFIER] == (classes, 0)
        assert not MODELS[name].weights.verified  # no published checksum: said, not hidden
    assert dataclasses.replace(MODELS["bvlc_googlenet"]).logits == "loss3/classifier"
