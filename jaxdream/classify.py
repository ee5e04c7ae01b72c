"""ImageNet classification with a loaded model: how a user checks that weights loaded right."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from jaxdream.models import LoadedModel, imagenet_labels


def eval_crop(image: np.ndarray, resize_size: int, crop_size: int) -> np.ndarray:
    """Standard ImageNet evaluation view, as torchvision computes it: shorter side to
    ``resize_size`` (PIL bilinear; the longer side truncated, not rounded), then a centre crop
    of ``crop_size`` (offsets rounded). Returns float32 on the 0..255 scale."""
    assert resize_size >= crop_size, "a model's resize size is never below its crop"
    height, width = image.shape[:2]
    if width <= height:
        new_w, new_h = resize_size, int(resize_size * height / width)
    else:
        new_w, new_h = int(resize_size * width / height), resize_size
    resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
    left = int(round((new_w - crop_size) / 2.0))
    top = int(round((new_h - crop_size) / 2.0))
    crop = resized.crop((left, top, left + crop_size, top + crop_size))
    return np.asarray(crop, dtype=np.float32)


def _probabilities(graphdef: nnx.GraphDef, endpoint: str, state: nnx.State, images: jax.Array
                   ) -> jax.Array:
    logits = nnx.merge(graphdef, state)(images, [endpoint])[endpoint]
    return jax.nn.softmax(logits, axis=-1)


_probabilities_jit = jax.jit(_probabilities, static_argnums=(0, 1))


def classify(model: LoadedModel, images: Sequence[np.ndarray], top: int = 5
             ) -> list[list[tuple[int, str, float]]]:
    """Top-``top`` (class index, label, probability) for each H x W x 3 uint8 image."""
    spec = model.spec
    batch = jnp.asarray(np.stack([eval_crop(image, spec.resize_size, spec.crop_size)
                                  for image in images]))
    graphdef, state = nnx.split(model.module)
    probs = np.asarray(_probabilities_jit(graphdef, spec.logits, state, batch))
    labels = (imagenet_labels() if spec.labels == "imagenet"
              else [f"class {i}" for i in range(probs.shape[-1])])
    results = []
    for row in probs:
        best = np.argsort(-row)[:top]
        results.append([(int(i), labels[int(i)], float(row[i])) for i in best])
    return results
