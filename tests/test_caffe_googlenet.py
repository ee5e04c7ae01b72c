"""Caffe GoogLeNet without torch: the classic preset is the notebook's step on this network,
the endpoints fit their table, the forward stops early, and ``jaxdream`` runs it from a
``.caffemodel`` end to end (random weights, written by the test)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import caffefmt as cf
from conftest import EXAMPLES
from jaxdream import ascent as dream
from jaxdream.cli import main
from jaxdream.engine import static_settings
from jaxdream.errors import CheckpointError
from jaxdream.images import read_recipe
from jaxdream.models import MODELS, caffe_googlenet, load_model
from jaxdream.models.checkpoint import sha256_file
from jaxdream.recipe import PRESETS


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("caffe") / "bvlc_googlenet.caffemodel"
    path.write_bytes(cf.caffemodel(cf.googlenet_params(seed=3), v1=True))
    return path


@pytest.fixture(autouse=True)
def _private_compile_cache(tmp_path_factory: pytest.TempPathFactory,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAXDREAM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _notebook_step(net, src: np.ndarray, shift: tuple[int, int], end: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    """google/deepdream's make_step on one H x W x 3 image, transcribed: ``src`` is the
    preprocessed image (BGR minus the mean) and ``net`` maps it straight to the endpoint."""
    bias = np.asarray(caffe_googlenet.IMAGENET_MEAN_BGR, np.float32)
    src = np.roll(src, shift, axis=(0, 1))  # apply jitter shift
    g = np.asarray(jax.grad(lambda s: 0.5 * jnp.sum(net(s[None])[end] ** 2))(jnp.asarray(src)))
    src = src + 1.5 / np.abs(g).mean() * g  # objective_L2, normalised ascent
    src = np.roll(src, (-shift[0], -shift[1]), axis=(0, 1))  # unshift image
    return np.clip(src, -bias, 255 - bias)


def test_the_classic_step_is_the_notebooks_on_mean_subtracted_bgr(weights: Path) -> None:
    """jaxdream dreams on RGB 0..255 and the network subtracts the mean inside; the notebook
    dreams on the mean-subtracted BGR blob and clips it to [-mean, 255 - mean]. One step of
    each, with the same jitter, gives the same picture."""
    module = load_model("bvlc_googlenet", weights).module
    end = "inception_4c/output"
    classic = PRESETS["classic"]
    settings = static_settings(dataclasses.replace(classic, layers=((end, 1.0),)))
    assert (settings.octaves, settings.octave_scale, settings.steps) == (4, 1.4, 10)
    assert (classic.step_size, classic.jitter) == (1.5, 32)

    with Image.open(EXAMPLES / "chelsea.jpg") as photo:
        rgb = np.asarray(photo.convert("RGB").resize((128, 96)), np.float32)
    params = dream.sample_params(96, 128, settings)
    key = jax.random.key(11)
    optimiser = dream.update_rule(settings, params.step_size,
                                  dream.pixel_mask((96, 128), params.sizes[0]))
    ours, _ = dream.gradient_ascent_step(lambda x: module(x, [end]), settings,
                                         jnp.asarray(rgb), params.sizes[0], key, params,
                                         optimiser, optimiser.init(jnp.asarray(rgb)))
    shift = tuple(int(s) for s in jax.random.randint(key, (2,), -32, 33))

    # The notebook's net takes the preprocessed blob as it is: the same weights with no mean,
    # fed the blob's channels back in RGB order so that the model's own BGR swap undoes it.
    plain = nnx.clone(module)
    plain.config = dataclasses.replace(module.config, mean_bgr=(0.0, 0.0, 0.0))
    mean = np.asarray(caffe_googlenet.IMAGENET_MEAN_BGR, np.float32)
    src = rgb[..., ::-1] - mean  # preprocess(net, img)
    stepped = _notebook_step(lambda blob: plain(blob[..., ::-1], [end]), src, shift, end)
    theirs = stepped[..., ::-1] + mean[::-1]  # deprocess
    assert np.abs(np.asarray(ours) - rgb).mean() == pytest.approx(1.5, rel=0.05)  # it moved
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-3)


def test_endpoint_table_and_early_stop() -> None:
    spec = MODELS["bvlc_googlenet"]
    module = nnx.eval_shape(lambda: spec.build(nnx.Rngs(0)))
    graphdef, state = nnx.split(module)
    shapes = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                            jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    assert list(spec.endpoints) == list(caffe_googlenet.ENDPOINTS)
    assert set(shapes) == set(spec.endpoints)  # (jax returns dicts with sorted keys)
    for name, (channels, stride) in spec.endpoints.items():
        if stride == 0:
            assert shapes[name].shape == (1, channels), name
        elif name != "pool5/7x7_s1":
            assert shapes[name].shape == (1, 224 // stride, 224 // stride, channels), name
    assert shapes["pool5/7x7_s1"].shape == (1, 1, 1, 1024)

    def equations(endpoints: list[str]) -> int:
        return len(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x, endpoints))(
            state, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)).eqns)

    assert equations(["conv2/3x3"]) < equations(["inception_3b/5x5_reduce"]) < equations(
        ["inception_4c/output"]) < equations(["loss3/classifier"])
    with pytest.raises(KeyError, match="inception_6a/output"):
        nnx.merge(graphdef, state)(jnp.zeros((1, 64, 64, 3)), ["inception_6a/output"])


def test_jaxdream_dreams_and_classifies_with_a_caffemodel(
        weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["dream", str(EXAMPLES / "chelsea.jpg"), "-o", str(out), "--model",
                 "bvlc_googlenet", "--weights", str(weights), "--max-side", "64",
                 "--octaves", "2", "--steps", "2", "-q"])
    assert code == 0, capsys.readouterr().err
    recipe = read_recipe(out / "chelsea_dream.png")
    assert recipe["model"] == "bvlc_googlenet" and recipe["preset"] == "classic"
    assert recipe["layers"] == {"inception_4c/output": 1.0}
    assert recipe["weights_sha256"] == sha256_file(weights)
    capsys.readouterr()
    code = main(["dream", str(EXAMPLES / "chelsea.jpg"), "-o", str(tmp_path / "b"), "--model",
                 "bvlc_googlenet", "--weights", str(weights), "--layers",
                 "inception_3b/5x5_reduce:1,conv2/3x3:0.5", "--max-side", "48", "--octaves",
                 "1", "--steps", "1", "-q"])
    assert code == 0, capsys.readouterr().err
    assert read_recipe(tmp_path / "b" / "chelsea_dream.png")["layers"] == {
        "inception_3b/5x5_reduce": 1.0, "conv2/3x3": 0.5}
    capsys.readouterr()
    assert main(["classify", str(EXAMPLES / "chelsea.jpg"), "--model", "bvlc_googlenet",
                 "--weights", str(weights), "--top", "2"]) == 0
    assert len([line for line in capsys.readouterr().out.splitlines() if "(" in line]) == 2


def test_models_lists_the_caffe_networks_with_their_layers(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "bvlc_googlenet"]) == 0
    listing = capsys.readouterr().out
    for endpoint in ("conv2/3x3", "inception_3b/5x5_reduce", "inception_4c/output",
                     "pool5/7x7_s1", "loss3/classifier"):
        assert endpoint in listing
    assert "dl.caffe.berkeleyvision.org/bvlc_googlenet.caffemodel" in listing
    assert main(["weights", "list"]) == 0
    listing = capsys.readouterr().out
    assert "googlenet_places205" in listing and "no published checksum" in listing


def test_hostile_and_odd_weights_files_are_refused_before_anything_runs(tmp_path: Path) -> None:
    import os

    import torchfmt as tf

    marker = tmp_path / "ran"
    evil = tmp_path / "bvlc_googlenet.pth"
    evil.write_bytes(tf.zip_bytes({"conv1_7x7_s2.weight": tf.Call("os.system",
                                                                   f"touch {marker}")}))
    with pytest.raises(CheckpointError, match="os.system"):
        load_model("bvlc_googlenet", evil)
    assert not marker.exists()
    fifo = tmp_path / "pipe.caffemodel"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        caffe_googlenet.load(fifo, caffe_googlenet.CaffeGoogLeNetConfig())
    jpeg = tmp_path / "photo.caffemodel"
    jpeg.write_bytes((EXAMPLES / "chelsea.jpg").read_bytes())
    with pytest.raises(CheckpointError, match=f"caffemodel {jpeg}: "):
        load_model("bvlc_googlenet", jpeg)
