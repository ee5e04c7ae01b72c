"""VGG16's layer table, endpoints, key map and catalogue entry (no JAX; the network is
:mod:`jaxdream.models.vgg`)."""

from __future__ import annotations

from jaxdream.models.keys import OIHW_TO_HWIO, KeyMapEntry, linear_entries
from jaxdream.models.registry import register_torchvision

#: Configuration "D": output channels of each 3x3 convolution, "M" for a 2x2/2 max pool.
_CONFIG_D: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                    512, 512, 512, "M", 512, 512, 512, "M")


#: Spatial size of the map fed to the classifier (torchvision's ``AdaptiveAvgPool2d((7, 7))``).
POOLED_SIZE = (7, 7)


NUM_CLASSES = 1000


FC_WIDTH = 4096


#: pytorch-deepdream's default for VGG16 (``--layers_to_use relu4_3``, the same tensor).
DEFAULT_LAYERS = "conv4_3"


PREPROCESSING = "(x / 255 - ImageNet mean) / ImageNet std on RGB 0..255, torchvision VGG16"


#: torchvision's ``VGG16_Weights.IMAGENET1K_V1``: URL and the hash prefix in its file name.
OFFICIAL_WEIGHTS = ("https://download.pytorch.org/models/vgg16-397923af.pth", "397923af")


def _layers() -> list[tuple[str, int, int | None]]:
    """(endpoint name, index in torchvision's ``features``, output channels or None for a pool).

    The index is that of the convolution (whose ReLU is the next index) or of the pool.
    """
    layers: list[tuple[str, int, int | None]] = []
    stage, conv_in_stage, index = 1, 1, 0
    for entry in _CONFIG_D:
        if entry == "M":
            layers.append((f"pool{stage}", index, None))
            stage, conv_in_stage, index = stage + 1, 1, index + 1
        else:
            layers.append((f"conv{stage}_{conv_in_stage}", index, int(entry)))
            conv_in_stage, index = conv_in_stage + 1, index + 2  # conv, then its ReLU
    return layers


#: Every endpoint in forward order.
ENDPOINTS: tuple[str, ...] = (*(name for name, _, _ in _layers()), "fc6", "fc7", "logits")


def endpoint_table() -> dict[str, tuple[int, int]]:
    """Endpoint name -> (channels, stride relative to the input); stride 0 when not spatial.

    Pools floor odd sizes (no ``ceil_mode``), so a spatial endpoint is ``size // stride`` wide.
    """
    table: dict[str, tuple[int, int]] = {}
    channels, stride = 3, 1
    for name, _, out_channels in _layers():
        if out_channels is None:
            stride *= 2
        else:
            channels = out_channels
        table[name] = (channels, stride)
    table["fc6"] = (FC_WIDTH, 0)
    table["fc7"] = (FC_WIDTH, 0)
    table["logits"] = (NUM_CLASSES, 0)
    return table


def key_map() -> list[KeyMapEntry]:
    """(target parameter path, checkpoint key, transpose) for every parameter of the model."""
    entries: list[KeyMapEntry] = []
    conv_indices = [index for _, index, channels in _layers() if channels is not None]
    for i, index in enumerate(conv_indices):
        entries.append((("convs", i, "kernel"), f"features.{index}.weight", OIHW_TO_HWIO))
        entries.append((("convs", i, "bias"), f"features.{index}.bias", None))
    # classifier = Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear.
    for target, index in (("fc6", 0), ("fc7", 3), ("fc8", 6)):
        entries.extend(linear_entries(target, f"classifier.{index}"))
    return entries


def ignored_key(key: str) -> bool:
    """Checkpoint entries that carry no inference parameter: VGG16 without BN has none."""
    return False


register_torchvision(
    "vgg16", "VGG16 (torchvision, 138 M parameters)",
    module="jaxdream.models.vgg", key_map=key_map(), ignore_key=ignored_key,
    endpoints=endpoint_table(), default_layers=DEFAULT_LAYERS, preprocessing=PREPROCESSING,
    official_weights=OFFICIAL_WEIGHTS)
