"""Convolution building blocks shared by the model files.

Kernels are stored in JAX's HWIO layout; the converters transpose PyTorch's OIHW once, at load
time. Batch norm is kept as its four checkpoint tensors (so conversion maps keys one to one) and
folded into the convolution inside the forward pass, which costs a few hundred flops per channel
and saves a full elementwise pass over every activation in both the forward and backward pass.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from functools import partial
from typing import Any, Literal, cast

import jax
import jax.numpy as jnp
from flax import nnx

#: torchvision's ImageNet input normalisation (on 0..1 pixels).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DepthwiseImpl = Literal["grouped", "shifted"]

#: Environment variable that forces one depthwise-convolution form ("grouped" or "shifted").
DEPTHWISE_ENV = "JAXDREAM_DEPTHWISE"


Stage = tuple[str, Callable[[jax.Array], jax.Array]]


_COMPUTE_DTYPE: contextvars.ContextVar[Any] = contextvars.ContextVar("compute_dtype",
                                                                      default=None)


@contextlib.contextmanager
def compute_dtype(dtype: Any) -> Iterator[None]:
    """Networks traced inside run in ``dtype`` (e.g. bfloat16) from their first stage on.

    The cast happens after each model's own preprocessing, so pixels are scaled in float32
    (a dreamed image's fractional grey levels would not survive bfloat16 on the 0..255
    scale); the parameters must already be in ``dtype``.
    """
    token = _COMPUTE_DTYPE.set(dtype)
    try:
        yield
    finally:
        _COMPUTE_DTYPE.reset(token)


def cast_to_compute_dtype(x: jax.Array) -> jax.Array:
    """``x`` in the dtype set by :func:`compute_dtype` (unchanged when none is set); for
    models that run their own layer loop instead of :func:`run_stages`."""
    dtype = _COMPUTE_DTYPE.get()
    return x if dtype is None else x.astype(dtype)


def run_stages(stages: Iterable[Stage], x: jax.Array, order: Sequence[str],
               endpoints: Collection[str] | None) -> dict[str, jax.Array]:
    """Runs a model's named stages in order and stops after the deepest requested endpoint.

    Returns the requested endpoints (all of them if ``endpoints`` is None); an unknown name is
    a KeyError that lists the model's endpoints.
    """
    dtype = _COMPUTE_DTYPE.get()
    if dtype is not None:
        x = x.astype(dtype)
    wanted = set(order if endpoints is None else endpoints)
    unknown = wanted - set(order)
    if unknown:
        raise KeyError(f"unknown endpoint(s) {sorted(unknown)}; this model has {list(order)}")
    deepest = max(order.index(name) for name in wanted)
    out: dict[str, jax.Array] = {}
    for index, (name, stage) in enumerate(stages):
        assert name == order[index], f"stage {name!r} out of order"
        x = out[name] = stage(x)
        if index == deepest:
            break
    return {name: out[name] for name in order if name in wanted}


def depthwise_impl() -> DepthwiseImpl:
    """Which convolution forms to trace, chosen per backend: ``shifted`` (the written forms
    below: depthwise convolutions as shifted slices, hand-written input gradients) or
    ``grouped`` (XLA's own convolutions and autodiff).

    CPU: XLA runs ``feature_group_count=C`` convolutions 10-30x slower than the same
    computation as a sum of shifted slices (measured before the project began). GPU: on an
    H200 the written forms dreamed Lite0 2.1x (batch 1) and 2.5x (batch 32) faster than cuDNN's
    grouped kernels, which took 66% of the batch-32 time
    (``benchmarks/results/gpu_issue11_h200.log``). TPUs keep XLA's forms (not measured). The
    choice is made when a function is traced, so it follows the backend compiled for.
    """
    forced = os.environ.get(DEPTHWISE_ENV, "").strip().lower()
    if forced in ("grouped", "shifted"):
        return forced  # type: ignore[return-value]
    return "shifted" if jax.default_backend() in ("cpu", "gpu") else "grouped"


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding for one spatial axis: extra pixel goes after, as in TF."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _shifted_sum(xp: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Valid depthwise correlation of padded ``xp`` with a (kh, kw, 1, C) kernel."""
    kh, kw = kernel.shape[0], kernel.shape[1]
    n, h, w, c = xp.shape
    out_h = (h - kh) // stride + 1
    out_w = (w - kw) // stride + 1
    acc = None
    for i in range(kh):
        for j in range(kw):
            window = jax.lax.slice(
                xp, (0, i, j, 0),
                (n, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c),
                (1, stride, stride, 1))
            term = window * kernel[i, j, 0]
            acc = term if acc is None else acc + term
    assert acc is not None
    return acc


Pads = tuple[tuple[int, int], tuple[int, int]]


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_shifted(x: jax.Array, kernel: jax.Array, stride: int, pads: Pads) -> jax.Array:
    """Depthwise convolution as k*k strided slices times per-channel weights.

    XLA fuses the slices and multiply-adds into one loop, which on CPU beats its
    grouped-convolution kernel by an order of magnitude. The gradient is written by hand for
    the same reason: autodiff of strided slices gives k*k scatter-like pads, while the true
    transpose is one more shifted sum over the (dilated) output gradient with a flipped kernel.
    """
    (pt, pb), (pl, pr) = pads
    return _shifted_sum(jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0))), kernel, stride)


def _depthwise_fwd(x: jax.Array, kernel: jax.Array, stride: int, pads: Pads
                   ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _depthwise_shifted(x, kernel, stride, pads), (x, kernel)


def _depthwise_bwd(stride: int, pads: Pads, residuals: tuple[jax.Array, jax.Array],
                   dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    kh, kw = kernel.shape[0], kernel.shape[1]
    z = jax.lax.pad(dy, jnp.zeros((), dy.dtype),
                    _transposed_input_pads(x.shape, dy.shape, kh, kw, stride, pads))
    dx = _shifted_sum(z, kernel[::-1, ::-1], 1)
    # Kernels get no gradient on these paths (the caller stops it, see conv2d).
    dk = jnp.zeros_like(kernel)
    return dx, dk.astype(kernel.dtype)


_depthwise_shifted.defvjp(_depthwise_fwd, _depthwise_bwd)


def _depthwise_grouped(x: jax.Array, kernel: jax.Array, stride: int, pads: Pads) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def _transposed_input_pads(x_shape: tuple[int, ...], dy_shape: tuple[int, ...], kh: int,
                           kw: int, stride: int, pads: Pads) -> tuple[tuple[int, int, int], ...]:
    """lax.pad config that dilates dy by the stride and pads it so that a stride-1 valid
    correlation with the flipped kernel lands exactly on x's pixels (negative = crop)."""
    (pt, _), (pl, _) = pads
    h, w = x_shape[1], x_shape[2]
    dilated_h = (dy_shape[1] - 1) * stride + 1
    dilated_w = (dy_shape[2] - 1) * stride + 1
    return ((0, 0, 0), (kh - 1 - pt, h - dilated_h + pt, stride - 1),
            (kw - 1 - pl, w - dilated_w + pl, stride - 1), (0, 0, 0))


def _dense(x: jax.Array, kernel: jax.Array, stride: int, pads: Pads) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense_cpu(x: jax.Array, kernel: jax.Array, stride: int, pads: Pads) -> jax.Array:
    """A dense convolution whose input gradient is written as a plain forward convolution.

    XLA on CPU runs the convolution that autodiff emits for the input gradient 3-4x slower
    inside a loop (the dream's step loop) than outside it (measured: 3x3, 128 channels,
    192x256: 576 ms in a fori_loop against 172 ms alone); the same gradient written as a
    stride-1 convolution of the dilated, padded output gradient with the flipped, transposed
    kernel runs at full speed in both places (162 ms).
    """
    return _dense(x, kernel, stride, pads)


def _dense_cpu_fwd(x: jax.Array, kernel: jax.Array, stride: int, pads: Pads
                   ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _dense(x, kernel, stride, pads), (x, kernel)


def _dense_cpu_bwd(stride: int, pads: Pads, residuals: tuple[jax.Array, jax.Array],
                   dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    kh, kw = kernel.shape[0], kernel.shape[1]
    z = jax.lax.pad(dy, jnp.zeros((), dy.dtype),
                    _transposed_input_pads(x.shape, dy.shape, kh, kw, stride, pads))
    dx = _dense(z, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2), 1, ((0, 0), (0, 0)))
    dk = jnp.zeros_like(kernel)  # the caller stops the kernel's gradient, see conv2d
    return dx, dk


_dense_cpu.defvjp(_dense_cpu_fwd, _dense_cpu_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _strided_cpu(x: jax.Array, kernel: jax.Array, stride: int, pads: Pads) -> jax.Array:
    """A strided dense convolution whose input gradient is written in the sub-pixel form.

    Autodiff's form correlates the stride-dilated dy, so 3 of every 4 products (stride 2) are
    with zeros, and the stems' gradients have 3 output channels, which XLA's CPU convolution
    runs badly: Lite0's stem gradient took 18% of its step, GoogLeNet's 7x7 one 22%. Split by
    output phase, pixel ``s*q + r`` of the gradient only meets taps ``s*m + r``, so all s*s
    phases are one stride-1 convolution of dy with a ceil(k/s)-tap kernel and s*s*C outputs
    (tap products and shifted sums for an image's 3 channels), then depth-to-space. Small
    kernels also run forward as patches times a matrix (see PATCH_LIMIT).
    """
    return _strided_forward(x, kernel, stride, pads)


#: Largest patch (kernel taps x input channels) that a strided convolution forms as patches
#: times a matrix: Lite's 3x3x3 stem took 1.4 instead of 2.8 ms at 512x384; GoogLeNet's
#: 7x7x3 stem (147) took 3.5x longer that way, so it stays a convolution.
PATCH_LIMIT = 32
#: Input channels up to which the phase gradient is tap products and shifted sums rather than
#: a convolution (an image's 3; see _strided_cpu_bwd). Both together: Lite0 43-48 -> 39-41 ms
#: a step, GoogLeNet 98-99 -> 90-91, ResNet50 176-184 -> 168-171 (alternating runs).
TAP_PRODUCT_CHANNELS = 4


def _strided_forward(x: jax.Array, kernel: jax.Array, stride: int, pads: Pads) -> jax.Array:
    kh, kw, c, d = kernel.shape
    if kh * kw * c > PATCH_LIMIT:
        return _dense(x, kernel, stride, pads)
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    n, h, w = xp.shape[:3]
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    patches = jnp.concatenate(
        [jax.lax.slice(xp, (0, i, j, 0), (n, i + (oh - 1) * stride + 1,
                                          j + (ow - 1) * stride + 1, c), (1, stride, stride, 1))
         for i in range(kh) for j in range(kw)], axis=-1)
    return jnp.einsum("nhwp,pd->nhwd", patches, kernel.reshape(kh * kw * c, d))


def _strided_cpu_fwd(x: jax.Array, kernel: jax.Array, stride: int, pads: Pads
                     ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _strided_forward(x, kernel, stride, pads), (x, kernel)


def _phase_kernel(kernel: jax.Array, stride: int) -> jax.Array:
    """HWIO (k, k, C, D) -> (m, m, D, s*s*C): tap j of phase (ry, rx) is the kernel's tap
    s*(m-1-j) + r (zero past the kernel's edge), so that a correlation of dy lands on the
    gradient pixel s*q + r; outputs ordered (ry, rx, c) for depth-to-space."""
    kh, kw, c, d = kernel.shape
    mh, mw = -(-kh // stride), -(-kw // stride)
    padded = jnp.pad(kernel, ((0, mh * stride - kh), (0, mw * stride - kw), (0, 0), (0, 0)))
    taps = padded.reshape(mh, stride, mw, stride, c, d)[::-1, :, ::-1]
    return taps.transpose(0, 2, 5, 1, 3, 4).reshape(mh, mw, d, stride * stride * c)


def _strided_cpu_bwd(stride: int, pads: Pads, residuals: tuple[jax.Array, jax.Array],
                     dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    (pt, _), (pl, _) = pads
    n, h, w, c = x.shape
    mh, mw = -(-kernel.shape[0] // stride), -(-kernel.shape[1] // stride)
    # Rows q of the phase outputs cover padded-input rows s*q .. s*q + s - 1; enough of them
    # to reach the last real pixel, dy being zero past its end.
    qh, qw = -(-(pt + h) // stride), -(-(pl + w) // stride)
    padded = jnp.pad(dy, ((0, 0), (mh - 1, max(qh - dy.shape[1], 0)),
                          (mw - 1, max(qw - dy.shape[2], 0)), (0, 0)))
    phase_kernel = _phase_kernel(kernel, stride)
    if c <= TAP_PRODUCT_CHANNELS:
        # An image's gradient (a stem, 3 channels): the convolution's 12 outputs run slowly;
        # every tap's product at once as one matrix product, then m*m shifted sums, is faster
        # (Lite0's stem 1.45 -> 0.60 ms, GoogLeNet's 6.8 -> 4.0 ms at 512x384).
        taps = jnp.einsum("nhwd,ijdo->nhwijo", padded, phase_kernel)
        phases = sum(taps[:, i:i + qh, j:j + qw, i, j] for i in range(mh) for j in range(mw))
    else:
        phases = _dense(padded, phase_kernel, 1, ((0, 0), (0, 0)))[:, :qh, :qw]
    phases = phases.reshape(n, qh, qw, stride, stride, c)
    dx = phases.transpose(0, 1, 3, 2, 4, 5).reshape(n, qh * stride, qw * stride, c)
    return dx[:, pt:pt + h, pl:pl + w], jnp.zeros_like(kernel)  # kernel: see conv2d


_strided_cpu.defvjp(_strided_cpu_fwd, _strided_cpu_bwd)


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, *, groups: int = 1,
           padding: str | tuple[tuple[int, int], tuple[int, int]] = "SAME") -> jax.Array:
    """NHWC convolution with an HWIO kernel; depthwise convs take the fastest form per backend.

    ``padding`` is "SAME" (TensorFlow semantics: the odd pixel goes after) or explicit pairs.
    """
    kh, kw = kernel.shape[0], kernel.shape[1]
    if padding == "SAME":
        pads = (same_padding(x.shape[1], kh, stride), same_padding(x.shape[2], kw, stride))
    else:
        pads = padding  # type: ignore[assignment]
    channels = x.shape[-1]
    written = depthwise_impl() == "shifted"
    if written:
        # The hand-written gradients below are for the image only: jaxdream never trains, and
        # computing kernel gradients there cost seconds per step under vmap. Stopping the
        # kernel's gradient here makes that explicit (a weight gradient is exactly zero).
        kernel = jax.lax.stop_gradient(kernel)
    if groups > 1 and groups == channels and kernel.shape[2] == 1 and written:
        return _depthwise_shifted(x, kernel, stride, pads)  # type: ignore[arg-type]
    if kh == 1 and kw == 1 and stride == 1 and groups == 1 and not any(sum(pads, ())):
        # A 1x1 convolution is a matrix product over channels; XLA's dot is at least as fast.
        return jnp.einsum("nhwc,cd->nhwd", x, kernel[0, 0])
    if groups == 1 and written:
        # The written forms go together: XLA's own grouped conv and conv gradients elsewhere.
        if stride == 1:
            return _dense_cpu(x, kernel, stride, pads)  # type: ignore[arg-type]
        return _strided_cpu(x, kernel, stride, pads)  # type: ignore[arg-type]
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


Activation = Literal["relu", "relu6"] | None
Padding = Literal["SAME"] | int


def activate(x: jax.Array, activation: Activation) -> jax.Array:
    if activation == "relu":
        return jax.nn.relu(x)
    if activation == "relu6":
        return jax.nn.relu6(x)
    return x


def _pads(padding: Padding, x: jax.Array, kernel_size: int, stride: int) -> Pads:
    """TF "SAME" padding or PyTorch's symmetric ``padding=p``, as explicit pairs."""
    if padding == "SAME":
        return (same_padding(x.shape[1], kernel_size, stride),
                same_padding(x.shape[2], kernel_size, stride))
    return ((padding, padding), (padding, padding))


_ABSTRACT: contextvars.ContextVar[bool] = contextvars.ContextVar("abstract", default=False)


class _NoRandomness:
    """The generator handed to a model built abstractly: no weight is drawn there, and making
    a real ``nnx.Rngs`` costs JAX's first random key (0.1 s)."""

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a weight was drawn at random in an abstract build: every weight "
                           "must come from jaxdream.models.layers")

    params = default = __call__ = _refuse


def build_abstract(build: Callable[[nnx.Rngs], nnx.Module]) -> nnx.Module:
    """``build(rngs)`` with every weight a ``jax.ShapeDtypeStruct``, to be filled from a
    checkpoint: the module ``nnx.eval_shape(lambda: build(nnx.Rngs(0)))`` gives, without
    tracing every layer's initialiser (0.2-0.3 s of each command on 2 cores, README Speed).
    Every weight comes from this file."""
    token = _ABSTRACT.set(True)
    try:
        return build(cast(nnx.Rngs, _NoRandomness()))
    finally:
        _ABSTRACT.reset(token)


def _weight(shape: tuple[int, ...], init: Callable[[], jax.Array]) -> Any:
    return jax.ShapeDtypeStruct(shape, jnp.float32) if _ABSTRACT.get() else init()


def _he_normal(rngs: nnx.Rngs, shape: tuple[int, ...]) -> Any:
    """Random weights of He et al.'s scale (fan in: every axis but the last)."""
    fan_in = 1
    for size in shape[:-1]:
        fan_in *= size
    return _weight(shape, lambda: jax.nn.initializers.normal(stddev=(2.0 / fan_in) ** 0.5)(
        rngs.params(), shape))


def _filled(size: int, value: float) -> Any:
    return _weight((size,), lambda: jnp.full((size,), value, jnp.float32))


class ConvBN(nnx.Module):
    """Bias-free convolution, inference-mode batch norm, then an optional activation.

    ``padding`` is "SAME" (TensorFlow-trained weights such as EfficientNet-Lite's) or an int
    (PyTorch's symmetric padding, as in torchvision's models).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 *, groups: int = 1, activation: Activation = "relu6", eps: float = 1e-3,
                 padding: Padding = "SAME", rngs: nnx.Rngs):
        self.kernel = nnx.Param(_he_normal(rngs, (kernel_size, kernel_size,
                                                  in_channels // groups, out_channels)))
        self.scale = nnx.Param(_filled(out_channels, 1.0))
        self.bias = nnx.Param(_filled(out_channels, 0.0))
        self.mean = nnx.BatchStat(_filled(out_channels, 0.0))
        self.var = nnx.BatchStat(_filled(out_channels, 1.0))
        self.stride = stride
        self.groups = groups
        self.activation = activation
        self.eps = eps
        self.padding = padding

    def __call__(self, x: jax.Array) -> jax.Array:
        factor = self.scale[...] * jax.lax.rsqrt(self.var[...] + self.eps)
        kernel = self.kernel[...] * factor
        shift = self.bias[...] - self.mean[...] * factor
        pads = _pads(self.padding, x, kernel.shape[0], self.stride)
        y = conv2d(x, kernel, self.stride, groups=self.groups, padding=pads) + shift
        return activate(y, self.activation)


class Conv(nnx.Module):
    """Convolution with a bias and an optional activation (VGG-style, no batch norm)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 *, activation: Activation = "relu", padding: Padding = 1, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_he_normal(rngs, (kernel_size, kernel_size, in_channels,
                                                  out_channels)))
        self.bias = nnx.Param(_filled(out_channels, 0.0))
        self.stride = stride
        self.activation = activation
        self.padding = padding

    def __call__(self, x: jax.Array) -> jax.Array:
        pads = _pads(self.padding, x, self.kernel.shape[0], self.stride)
        y = conv2d(x, self.kernel[...], self.stride, padding=pads) + self.bias[...]
        return activate(y, self.activation)


class Linear(nnx.Module):
    """A fully connected layer, ``x @ kernel + bias`` (kernel ``[in, out]``): the classifier
    heads. Flax's ``nnx.Linear`` would initialise its weights outside :func:`build_abstract`."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_he_normal(rngs, (in_features, out_features)))
        self.bias = nnx.Param(_filled(out_features, 0.0))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel[...] + self.bias[...]
