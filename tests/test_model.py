"""EfficientNet-Lite: layers, endpoints, strict conversion, and the real weights on real photos."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdream.classify import classify
from jaxdream.errors import ConversionError
from jaxdream.images import load_rgb
from jaxdream.models import MODELS, LoadedModel, imagenet_labels, load_model
from jaxdream.models import layers as L
from jaxdream.models import pooling
from jaxdream.models.checkpoint import load_state_dict
from jaxdream.models.convert import load_state_dict_into

from conftest import EXAMPLES


@pytest.mark.parametrize(("height", "width", "kernel", "stride"),
                         [(9, 10, 3, 1), (9, 10, 3, 2), (8, 11, 5, 2), (7, 7, 5, 1), (6, 9, 3, 2)])
def test_shifted_depthwise_equals_grouped_conv_with_gradients(height: int, width: int,
                                                             kernel: int, stride: int) -> None:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, height, width, 4)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(kernel, kernel, 1, 4)), jnp.float32)
    pads = (L.same_padding(height, kernel, stride), L.same_padding(width, kernel, stride))
    y_ref = L._depthwise_grouped(x, k, stride, pads)
    y = L._depthwise_shifted(x, k, stride, pads)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    cotangent = jnp.asarray(rng.normal(size=y_ref.shape), jnp.float32)

    def loss(fn):  # type: ignore[no-untyped-def]
        return lambda x, k: jnp.sum(fn(x, k, stride, pads) * cotangent)

    gx_ref = jax.grad(loss(L._depthwise_grouped))(x, k)
    gx = jax.grad(loss(L._depthwise_shifted))(x, k)
    np.testing.assert_allclose(gx, gx_ref, atol=1e-5)


@pytest.mark.parametrize(("height", "width", "kernel", "stride", "pad"),
                         [(9, 10, 3, 1, 1), (9, 10, 3, 2, 1), (11, 8, 7, 2, 3), (7, 7, 5, 1, 0),
                          (6, 9, 3, 2, 0), (8, 8, 1, 2, 0)])
def test_dense_conv_with_written_gradient_equals_autodiff(height: int, width: int, kernel: int,
                                                          stride: int, pad: int) -> None:
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, height, width, 3)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 5)), jnp.float32)
    pads = ((pad, pad), (pad, pad))
    y_ref = L._dense(x, k, stride, pads)
    np.testing.assert_allclose(L._dense_cpu(x, k, stride, pads), y_ref, atol=1e-5)
    cotangent = jnp.asarray(rng.normal(size=y_ref.shape), jnp.float32)

    def loss(fn):  # type: ignore[no-untyped-def]
        return lambda x, k: jnp.sum(fn(x, k, stride, pads) * cotangent)

    gx_ref = jax.grad(loss(L._dense))(x, k)
    gx = jax.grad(loss(L._dense_cpu))(x, k)
    np.testing.assert_allclose(gx, gx_ref, atol=1e-4)


@pytest.mark.parametrize(("height", "width", "kernel", "stride", "pads", "channels"),
                         [(12, 16, 3, 2, "SAME", 3), (11, 14, 3, 2, "SAME", 8),
                          (13, 9, 7, 2, 3, 3), (12, 12, 7, 2, 3, 8), (8, 8, 1, 2, 0, 3),
                          (10, 11, 5, 3, "SAME", 3), (9, 12, 4, 2, ((1, 2), (0, 1)), 8),
                          (7, 10, 3, 2, 0, 3), (7, 10, 3, 2, 0, 8)])
def test_strided_conv_phase_gradient_equals_autodiff(height: int, width: int, kernel: int,
                                                     stride: int, pads: object,
                                                     channels: int) -> None:
    """Strided convolutions' written forms: the patch forward of small kernels and the
    sub-pixel (phase) input gradient, as tap products (3 channels) or a convolution (8);
    every kernel size, stride, SAME's uneven padding and explicit pads, odd sizes whose last
    rows meet no output."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, height, width, channels)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(kernel, kernel, channels, 6)), jnp.float32)
    if pads == "SAME":
        pads = (L.same_padding(height, kernel, stride), L.same_padding(width, kernel, stride))
    elif isinstance(pads, int):
        pads = ((pads, pads), (pads, pads))
    y_ref = L._dense(x, k, stride, pads)
    np.testing.assert_allclose(L._strided_cpu(x, k, stride, pads), y_ref, rtol=1e-5, atol=1e-5)
    cotangent = jnp.asarray(rng.normal(size=y_ref.shape), jnp.float32)

    def loss(fn):  # type: ignore[no-untyped-def]
        return lambda x: jnp.sum(fn(x, k, stride, pads) * cotangent)

    gx_ref = jax.grad(loss(L._dense))(x)
    gx = jax.grad(loss(L._strided_cpu))(x)
    np.testing.assert_allclose(gx, gx_ref, atol=1e-4)
    assert float(jnp.abs(gx_ref).max()) > 1.0  # the gradient is not trivially zero


def test_cpu_forms_take_the_phase_gradient_for_strided_convolutions(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """conv2d's CPU forms route a strided dense convolution through the phase gradient (the
    optimised program has no convolution with a dilated input left) and agree with XLA's."""
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 17, 22, 3)), jnp.float32)
    k = jnp.asarray(np.random.default_rng(4).normal(size=(7, 7, 3, 8)), jnp.float32)
    grads, texts = {}, {}
    for form in ("shifted", "grouped"):
        monkeypatch.setenv(L.DEPTHWISE_ENV, form)
        fn = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(L.conv2d(x, k, 2)))))
        grads[form] = fn(x)
        texts[form] = fn.lower(x).compile().as_text()
    np.testing.assert_allclose(grads["shifted"], grads["grouped"], atol=1e-4)
    assert "lhs_dilate" in texts["grouped"]
    assert "lhs_dilate" not in texts["shifted"]


def test_cpu_forms_give_kernels_no_gradient_and_xla_forms_do(monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    x = jnp.ones((1, 6, 6, 4))
    dense, depthwise = jnp.ones((3, 3, 4, 2)), jnp.ones((3, 3, 1, 4))
    for form, expect_zero in (("shifted", True), ("grouped", False)):
        monkeypatch.setenv(L.DEPTHWISE_ENV, form)
        g_dense = jax.grad(lambda k: jnp.sum(L.conv2d(x, k)))(dense)
        g_depth = jax.grad(lambda k: jnp.sum(L.conv2d(x, k, groups=4)))(depthwise)
        for grad in (g_dense, g_depth):
            assert bool(jnp.all(grad == 0)) == expect_zero, form


def test_same_padding_is_tensorflows() -> None:
    assert L.same_padding(224, 3, 2) == (0, 1)  # TF puts the odd pixel after
    assert L.same_padding(225, 3, 2) == (1, 1)
    assert L.same_padding(10, 5, 1) == (2, 2)
    assert L.same_padding(10, 1, 1) == (0, 0)


def test_both_depthwise_forms_give_the_same_network(tiny_model: LoadedModel,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    x = jnp.asarray(np.random.default_rng(1).uniform(0, 255, (1, 37, 29, 3)), jnp.float32)
    results = {}
    for form in ("shifted", "grouped"):
        monkeypatch.setenv(L.DEPTHWISE_ENV, form)
        assert L.depthwise_impl() == form
        results[form] = jax.jit(lambda x: tiny_model.module(x))(x)
    for name in results["grouped"]:
        np.testing.assert_allclose(results["shifted"][name], results["grouped"][name],
                                   rtol=1e-4, atol=1e-4)


def test_the_written_forms_are_the_default_on_cpu_and_gpu_not_tpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(L.DEPTHWISE_ENV, raising=False)
    for backend, form in (("cpu", "shifted"), ("gpu", "shifted"), ("tpu", "grouped")):
        monkeypatch.setattr(L.jax, "default_backend", lambda backend=backend: backend)
        assert L.depthwise_impl() == form, backend


def test_endpoints_match_their_table(tiny_model: LoadedModel) -> None:
    x = jnp.zeros((1, 64, 48, 3))
    out = jax.eval_shape(lambda x: tiny_model.module(x), x)
    table = tiny_model.spec.endpoints
    assert list(table) == ["stem", "block0", "block1", "block2", "head", "logits"]
    assert set(out) == set(table)
    for name, (channels, stride) in table.items():
        if stride:
            assert out[name].shape == (1, -(-64 // stride), -(-48 // stride), channels), name
    assert out["logits"].shape == (1, 10)


def test_lite_endpoint_tables_and_default_layers() -> None:
    table = MODELS["efficientnet_lite0"].endpoints
    assert [f"block{i}" for i in range(16)] == [n for n in table if n.startswith("block")]
    assert table["block10"] == (112, 16) and table["block15"] == (320, 32)
    assert table["head"] == (1280, 32)
    # Lite1 and Lite2 are deeper (21 blocks); the default layer stays at the same place.
    for name, channels in (("efficientnet_lite1", 112), ("efficientnet_lite2", 120)):
        spec = MODELS[name]
        assert len([n for n in spec.endpoints if n.startswith("block")]) == 21
        assert spec.default_layers == "block14"
        assert spec.endpoints["block14"] == (channels, 16)
        assert spec.endpoints["block15"][0] != channels


def test_forward_stops_at_the_deepest_requested_endpoint(tiny_model: LoadedModel) -> None:
    x = jnp.zeros((1, 32, 32, 3))

    def convolutions(endpoints: list[str]) -> int:
        jaxpr = jax.make_jaxpr(lambda x: tiny_model.module(x, endpoints))(x)
        return str(jaxpr).count("conv_general_dilated") + str(jaxpr).count("dot_general")

    assert convolutions(["stem"]) < convolutions(["block1"]) < convolutions(["block2"])
    assert convolutions(["block1", "stem"]) == convolutions(["block1"])
    assert set(jax.eval_shape(lambda x: tiny_model.module(x, ["block1", "stem"]), x)) == {
        "stem", "block1"}
    with pytest.raises(KeyError, match="block7"):
        tiny_model.module(x, ["block7"])


def _fake_lite0_state_dict() -> dict[str, np.ndarray]:
    spec = MODELS["efficientnet_lite0"]
    module = nnx.eval_shape(lambda: spec.build(nnx.Rngs(0)))
    leaves = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(module))}
    state_dict: dict[str, np.ndarray] = {}
    for target, key, transpose in spec.key_map:
        shape = leaves[target].get_value().shape
        if transpose is not None:
            shape = tuple(shape[i] for i in np.argsort(transpose))
        state_dict[key] = np.full(shape, 0.5, np.float32)
    return state_dict


@pytest.mark.parametrize("name", list(MODELS))
def test_an_abstract_build_is_what_eval_shape_gives(name: str) -> None:
    # load_model builds with build_abstract (no initialiser traced): the same graph, the same
    # shapes and dtypes, and no array anywhere, so every weight must come from the checkpoint.
    build = MODELS[name].build
    graph, state = nnx.split(L.build_abstract(build))
    want_graph, want_state = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))))
    assert graph == want_graph
    assert jax.tree.structure(state) == jax.tree.structure(want_state)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(want_state), strict=True):
        assert isinstance(got, jax.ShapeDtypeStruct), type(got)
        assert (got.shape, got.dtype) == (want.shape, want.dtype)
    # No weight is drawn at random there, and the flag does not outlive the build: a plain
    # build has arrays again.
    with pytest.raises(RuntimeError, match="drawn at random in an abstract build"):
        L.build_abstract(lambda rngs: nnx.Linear(2, 3, rngs=rngs))
    assert all(isinstance(leaf, jax.Array)
               for leaf in jax.tree.leaves(nnx.state(L.ConvBN(3, 4, 3, rngs=nnx.Rngs(0)))))


def test_conversion_reports_every_problem_at_once() -> None:
    spec = MODELS["efficientnet_lite0"]
    state_dict = _fake_lite0_state_dict()
    del state_dict["_fc.bias"]
    del state_dict["_blocks.3._bn1.running_var"]
    state_dict["_blocks.16._expand_conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    state_dict["_conv_stem.weight"] = np.zeros((32, 3, 5, 5), np.float32)
    module = nnx.eval_shape(lambda: spec.build(nnx.Rngs(0)))
    with pytest.raises(ConversionError) as error:
        load_state_dict_into(module, state_dict, spec.key_map, ignore=spec.ignore_key)
    message = str(error.value)
    assert "missing keys (2): _blocks.3._bn1.running_var, _fc.bias" in message
    assert "unexpected keys (1): _blocks.16._expand_conv.weight" in message
    assert "_conv_stem.weight is (32, 3, 5, 5), expected (32, 3, 3, 3)" in message


def test_conversion_fills_every_parameter_exactly() -> None:
    spec = MODELS["efficientnet_lite0"]
    state_dict = _fake_lite0_state_dict()
    state_dict["_blocks.3._depthwise_conv.weight"] = np.arange(
        144 * 25, dtype=np.float32).reshape(144, 1, 5, 5)
    module = nnx.eval_shape(lambda: spec.build(nnx.Rngs(0)))
    load_state_dict_into(module, state_dict, spec.key_map, ignore=spec.ignore_key)
    kernel = np.asarray(module.blocks[3].depthwise.kernel.get_value())  # type: ignore[attr-defined]
    # OIHW (144, 1, 5, 5) -> HWIO (5, 5, 1, 144): element [c, 0, i, j] lands at [i, j, 0, c].
    assert kernel.shape == (5, 5, 1, 144)
    assert kernel[2, 4, 0, 7] == state_dict["_blocks.3._depthwise_conv.weight"][7, 0, 2, 4]
    for _, var in nnx.to_flat_state(nnx.state(module)):
        assert isinstance(var.get_value(), jax.Array), "a leaf was left abstract"


def test_the_embedded_checkpoint_fits_exactly(real_model: LoadedModel) -> None:
    path = MODELS["efficientnet_lite0"].local_weights()
    assert path is not None
    state_dict = load_state_dict(path)
    assert len(state_dict) == 296
    used = {key for _, key, _ in real_model.spec.key_map}
    assert set(state_dict) - used == {k for k in state_dict if k.endswith("num_batches_tracked")}
    assert real_model.weights_sha256.startswith("57934424")


def test_labels_are_imagenets() -> None:
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert labels[285] == "Egyptian cat" and labels[967] == "espresso" and labels[0] == "tench"


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1",
                                  "efficientnet_lite2"])
def test_real_weights_recognise_the_sample_photos(name: str) -> None:
    cat, coffee = (load_rgb(EXAMPLES / photo) for photo in ("chelsea.jpg", "coffee.jpg"))
    cat_top, coffee_top = classify(load_model(name), [cat, coffee], top=3)
    assert cat_top[0][0] in range(281, 286), cat_top  # tabby, tiger, Persian, Siamese, Egyptian
    assert coffee_top[0][0] in (967, 968), coffee_top  # espresso, cup


@pytest.mark.parametrize("first", [0.5, -0.0, float("nan"), float("inf")])
def test_a_value_computed_apart_is_the_value(first: float) -> None:
    # The max pool's gradient takes its incoming gradient through a conditional (a fusion
    # boundary on CPU); whichever branch runs, the values come back unchanged.
    x = np.random.default_rng(2).normal(size=(1, 5, 6, 7)).astype(np.float32)
    x[0, 0, 0, 0] = first
    x[0, 1, 2, 3] = -0.0
    out = np.asarray(jax.jit(pooling._computed_apart)(jnp.asarray(x)))
    np.testing.assert_array_equal(out, x)  # NaN equals NaN here; -0.0 equals 0.0


@pytest.mark.parametrize(("height", "width", "window", "stride", "padding", "ceil_mode"),
                         [(17, 22, 3, 2, 0, True), (16, 16, 3, 2, 0, True),
                          (12, 15, 3, 1, 1, True), (13, 11, 2, 2, 0, False),
                          (15, 14, 3, 2, 1, False)])
def test_max_pool_equals_xla_values_and_gradient_bit_for_bit(
        height: int, width: int, window: int, stride: int, padding: int, ceil_mode: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The written max pool (maximum of shifted slices, gradient by shifted slices with XLA's
    first-maximum tie rule) against XLA's reduce_window and its autodiff, on inputs full of
    ties (small integers) and on continuous ones."""
    rng = np.random.default_rng(5)
    for x in (jnp.asarray(rng.integers(0, 3, (2, height, width, 4)), jnp.float32),
              jnp.asarray(rng.normal(size=(2, height, width, 4)), jnp.float32)):
        results = {}
        for form in ("written", "xla"):
            if form == "xla":
                monkeypatch.setenv("JAXDREAM_MAXPOOL", "xla")
            else:
                monkeypatch.delenv("JAXDREAM_MAXPOOL", raising=False)

            def loss(x):  # type: ignore[no-untyped-def]
                y = pooling.max_pool(x, window, stride, padding, ceil_mode)
                return jnp.sum(y * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape)), y

            results[form] = jax.jit(jax.grad(loss, has_aux=True))(x)
        np.testing.assert_array_equal(results["written"][1], results["xla"][1])
        np.testing.assert_array_equal(results["written"][0], results["xla"][0])
        assert float(jnp.abs(results["xla"][0]).max()) > 0
