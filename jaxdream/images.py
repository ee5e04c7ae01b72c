# long: every way an image file can be hostile is handled here, in the order a file is read
"""Image input and output: the only place where jaxdream touches image files.

Loading is the part a user can break in a thousand ways (a half-downloaded JPEG, an HTML page
saved as ``.png``, a phone photo lying on its side, a 16-bit scan, a crafted decompression bomb),
so :func:`load_rgb` normalises every image it accepts to one shape, ``(H, W, 3) uint8`` RGB, and
turns every failure into a single :class:`~jaxdream.errors.ImageError` line naming the file and
the reason. Writing goes through :func:`save_png`, which embeds the render recipe in the PNG and
replaces the destination atomically, so an interrupted render never leaves a half-written file.

This module is pure I/O (Pillow + NumPy) and deliberately does not import JAX: it must be cheap
to import from tools and tests, and its behaviour must not depend on an accelerator.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import struct
import warnings
import zlib
from collections.abc import Callable
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from jaxdream.errors import ImageError
from jaxdream.files import Refused, atomic_write, open_regular_file
from jaxdream.files import display as _display

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_FILE_BYTES",
    "DEFAULT_MAX_PIXELS",
    "MAX_JPEG_EXIF_BYTES",
    "MAX_JPEG_METADATA_BYTES",
    "MAX_ASPECT",
    "MAX_RECIPE_BYTES",
    "MIN_SIDE",
    "RECIPE_KEY",
    "load_rgb",
    "load_rgb_bytes",
    "png_bytes",
    "read_recipe",
    "save_png",
    "to_uint8",
]

_log = logging.getLogger(__name__)

#: Largest declared ``width * height`` we agree to decode: 8192 x 8192 (67.1 megapixels).
#: That is above any ordinary camera or phone output (a 50 MP photo fits) while keeping the worst
#: case decode to about 200 MB of RGB (plus the same again for one conversion copy). The check
#: runs on the size declared in the header, *before* any pixel is decoded, so a 100 KB file
#: claiming 100000 x 100000 pixels costs nothing. Pillow's own guard (``Image.MAX_IMAGE_PIXELS``,
#: an error above twice its value) still applies on top and is reported the same way.
DEFAULT_MAX_PIXELS = 8192 * 8192

#: Largest image *file* we open: 256 MiB. A 67-megapixel photo is a few tens of MB as JPEG and
#: about 200 MB as an uncompressed 8-bit TIFF; anything larger is mostly not pixels (metadata,
#: padding, appended data) and is refused from its size alone, before a byte is read.
DEFAULT_MAX_FILE_BYTES = 256 * 2**20

#: JPEG metadata (APPn and COM segments before the image data) we let the decoder read: 16 MiB
#: in all, of which at most 1 MiB of EXIF. Real photos carry tens of KB (EXIF is one 64 KB
#: segment by the standard; ICC profiles and XMP can reach a few MB). Pillow joins EXIF segments
#: one by one, so 60 MB of EXIF in 920 segments costs it quadratic copying (17 s); the segment
#: headers are walked first, without reading their contents, and such files refused.
MAX_JPEG_METADATA_BYTES = 16 * 2**20
MAX_JPEG_EXIF_BYTES = 2**20

#: Smallest accepted side, in pixels. DeepDream works on an image pyramid; below this size there
#: is no octave left to work on and a convolutional network sees mostly padding. Such files are
#: almost always icons or thumbnails picked by mistake.
MIN_SIDE = 16

#: Largest accepted ratio of the longer side to the shorter one. Real panoramas stay well below
#: 32:1; beyond it the image is a strip (or a crafted file) that would be scaled down to a few
#: pixels across at the first octave.
MAX_ASPECT = 32

#: Container formats we let Pillow decode. Everything else is refused *before* a decoder runs:
#: Pillow knows about forty formats, some of which shell out to external programs (EPS runs
#: Ghostscript) or have little-exercised decoders. TGA is left out on purpose because it has no
#: magic number, so random bytes can be mistaken for it.
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")

#: Keyword of the PNG text chunk that carries the render recipe.
RECIPE_KEY = "jaxdream"

#: Largest recipe we write or read back. Matches Pillow's own ``MAX_TEXT_CHUNK`` so that any PNG
#: we write can also be opened by Pillow, and bounds what a hostile PNG can make us inflate.
MAX_RECIPE_BYTES = 1024 * 1024

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PIL_DIR = os.path.dirname(os.path.abspath(Image.__file__)) + os.sep
_MAX_REASON_CHARS = 200
# Segments a JPEG may have before its image data; each costs the decoder a Python loop turn.
_MAX_JPEG_SEGMENTS = 4096
_PILLOW_BOMB = re.compile(r"Image size \((\d+) pixels\) exceeds limit of (\d+)")

# Pillow modes holding 16-bit unsigned samples (one grey channel).
_MODES_16BIT = ("I;16", "I;16B", "I;16L", "I;16N")
# Modes that carry an alpha band (straight or premultiplied).
_MODES_WITH_ALPHA = ("LA", "La", "PA", "RGBA", "RGBa")
# Modes Pillow converts to RGB with a well-defined colour meaning and no alpha.
_MODES_PLAIN = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


# --------------------------------------------------------------------------------------------
# Messages


def _one_line(exc: object) -> str:
    """A short single-line rendering of an exception (or message) from Pillow or the OS."""
    text = str(exc).strip() or type(exc).__name__
    text = _display(" ".join(text.split()))
    if len(text) > _MAX_REASON_CHARS:
        text = text[: _MAX_REASON_CHARS - 3] + "..."
    return text


def _fail(name: str, reason: str) -> ImageError:
    return ImageError(f"{name}: {reason}")


# --------------------------------------------------------------------------------------------
# Opening files safely


def _open_regular_file(path: str | os.PathLike[str], name: str) -> IO[bytes]:
    """:func:`jaxdream.files.open_regular_file`, its refusals and the OS's errors worded as
    ImageErrors that name the file."""
    try:
        return open_regular_file(path)
    except Refused as exc:
        raise _fail(name, str(exc)) from None
    except FileNotFoundError as exc:
        if os.path.islink(path):
            try:
                target = _display(os.readlink(path))
            except OSError:
                target = "?"
            raise _fail(name, f"dangling symbolic link (its target {target} does not exist)") from exc
        raise _fail(name, "no such file") from exc
    except IsADirectoryError as exc:
        raise _fail(name, "is not a regular file (a directory)") from exc
    except PermissionError as exc:
        raise _fail(name, "permission denied (the file is not readable)") from exc
    except OSError as exc:
        raise _fail(name, f"cannot open ({_one_line(exc.strerror or exc)})") from exc
    except (ValueError, TypeError) as exc:  # e.g. an embedded NUL byte in the path
        raise _fail(name, f"invalid path ({_one_line(exc)})") from exc


def _claimed_format(head: bytes) -> str | None:
    """The allowed format whose magic number ``head`` starts with, if any."""
    if head.startswith(_PNG_SIGNATURE):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith((b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")):
        return "TIFF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return None


def _sniff_non_image(head: bytes) -> str | None:
    """A friendlier explanation for common non-images (web pages, text), or None."""
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if stripped[:1] == b"<":
        lowered = stripped[:64].lower()
        if lowered.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
            return "an HTML page, not an image (was it saved from a web browser?)"
        if lowered.startswith(b"<svg") or b"<svg" in stripped[:512].lower():
            return "an SVG (vector) file, not a raster image; export it as PNG first"
        return "XML/HTML text, not an image"
    if stripped.startswith(b"%!PS"):
        return "a PostScript/EPS file, which jaxdream does not decode"
    if stripped.startswith(b"%PDF"):
        return "a PDF document, not an image"
    if stripped and all(32 <= b < 127 or b in b"\t\r\n" for b in stripped[:256]):
        return "plain text, not an image"
    return None


# --------------------------------------------------------------------------------------------
# Loading


def load_rgb(
    path: str | os.PathLike[str],
    *,
    max_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> np.ndarray:
    """Load an image file as an ``(H, W, 3)`` ``uint8`` RGB array, or raise :class:`ImageError`.

    What is normalised, so that the renderer only ever sees 8-bit RGB:

    * EXIF orientation is applied (phone photos are stored sideways plus a rotation tag); the
      returned array is the image as a viewer shows it. A corrupt EXIF block is ignored (the
      pixels are still fine) and logged, as image viewers do.
    * Grey (``1``, ``L``, ``I``, ``I;16*``, ``F``), palette, CMYK, YCbCr and Lab images are
      converted to RGB. 16-bit samples are *scaled* (0..65535 to 0..255), never clipped, so a
      16-bit scan keeps its full tonal range. ``I`` (32-bit) samples are read as 16-bit values
      (clipped to 0..65535, then scaled); ``F`` (float) samples are read as 0..1 when every value
      lies in that range, else as 0..255 (Pillow's convention), non-finite values as 0.
    * Transparent images (alpha band or palette/tRNS transparency) are composited over white.
    * Multi-frame files (animated GIF/PNG/WebP, multi-page TIFF) give their **first frame
      only**; jaxdream renders stills.

    Limits, all checked *before* decoding: the file at most ``max_file_bytes``; JPEG metadata
    at most :data:`MAX_JPEG_METADATA_BYTES` (EXIF at most :data:`MAX_JPEG_EXIF_BYTES`);
    declared ``width * height <= max_pixels`` (decompression bombs), each side at least
    :data:`MIN_SIDE` pixels, and the aspect ratio at most :data:`MAX_ASPECT`. Only
    :data:`ALLOWED_FORMATS` are decoded, whatever the extension says. The whole image is decoded eagerly, so truncated or corrupt data is an error here and
    not a surprise later.

    Args:
        path: the image file.
        max_side: if given and the longer side is larger, downscale with Lanczos filtering so
            that the longer side equals ``max_side`` (aspect ratio kept, each side at least 1).
            Images are never upscaled.
        max_pixels: refuse images whose declared pixel count exceeds this.
        max_file_bytes: refuse files larger than this many bytes.

    Returns:
        A new, writable, C-contiguous ``(H, W, 3)`` ``uint8`` array.

    Raises:
        ImageError: for every problem with the file or its content, as one line
            ``"<path>: <reason>"``.
        ValueError: if ``max_side``, ``max_pixels`` or ``max_file_bytes`` is not a positive
            integer (a bug in the caller, not a property of the file).

    Note:
        Pillow's warnings (corrupt EXIF, its own decompression-bomb warning) are captured with
        :func:`warnings.catch_warnings` while decoding, so the result does not depend on the
        caller's warning filters; like any use of ``catch_warnings`` on Python < 3.14 this
        temporarily swaps the process-wide warning filters. Truncated files are only refused
        while Pillow's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is False (its default); this
        module never sets it.
    """
    if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1):
        raise ValueError(f"max_side must be a positive integer or None, got {max_side!r}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if isinstance(max_file_bytes, bool) or not isinstance(max_file_bytes, int) or max_file_bytes < 1:
        raise ValueError(f"max_file_bytes must be a positive integer, got {max_file_bytes!r}")

    name = _display(path)
    with _open_regular_file(path, name) as fp:
        return _decode_logged(fp, name, max_side=max_side, max_pixels=max_pixels,
                              max_file_bytes=max_file_bytes)


def load_rgb_bytes(data: bytes, name: str, *, max_side: int | None = None,
                   max_pixels: int = DEFAULT_MAX_PIXELS,
                   max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> np.ndarray:
    """:func:`load_rgb` for an image already in memory (an object read from a bucket or a URL):
    the same formats, limits, normalisation and one-line errors, naming ``name``."""
    if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1):
        raise ValueError(f"max_side must be a positive integer or None, got {max_side!r}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if not data:
        raise _fail(_display(name), "empty file (0 bytes)")
    return _decode_logged(io.BytesIO(data), _display(name), max_side=max_side,
                          max_pixels=max_pixels, max_file_bytes=max_file_bytes)


def _decode_logged(fp: IO[bytes], name: str, *, max_side: int | None, max_pixels: int,
                   max_file_bytes: int) -> np.ndarray:
    """:func:`_decode` with Pillow's warnings about the file logged, not raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _check_file_size(fp, name, max_file_bytes)
        _check_jpeg_metadata(fp, name)
        array = _decode(fp, name, max_side=max_side, max_pixels=max_pixels)
    for w in caught:
        if issubclass(w.category, Image.DecompressionBombWarning):
            continue  # superseded by our own header check against max_pixels
        if os.path.abspath(w.filename).startswith(_PIL_DIR):
            # Pillow complaining about the *file* (corrupt EXIF, odd TIFF tags): the image did
            # decode, so this is worth a log line, not a failure that depends on warning filters.
            _log.warning("%s: %s", name, _one_line(w.message))
        else:  # anything else (e.g. NumPy) is about our code: hand it back to the caller's filters
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return array


def _decode(fp: IO[bytes], name: str, *, max_side: int | None, max_pixels: int) -> np.ndarray:
    """Everything that runs Pillow on the open file; see :func:`load_rgb`."""
    # --- identify (reads the header only) ---
    try:
        img = Image.open(fp, formats=list(ALLOWED_FORMATS))
    except Image.DecompressionBombError as exc:
        raise _too_large(name, exc, max_pixels) from exc
    except UnidentifiedImageError as exc:
        try:
            fp.seek(0)
            head = fp.read(1024)
        except OSError:
            head = b""
        claimed = _claimed_format(head)
        if claimed is not None:
            # The signature is right but Pillow's header parser gave up: the file was cut short
            # or damaged right at the start (a download that stopped after a few bytes).
            reason = f"truncated or corrupt {claimed} header"
        else:
            reason = _sniff_non_image(head) or (
                "not a recognised image (supported: " + ", ".join(ALLOWED_FORMATS) + ")"
            )
        raise _fail(name, reason) from exc
    except Exception as exc:  # Pillow raises SyntaxError, ValueError, struct.error, ... on bad headers
        raise _fail(name, f"corrupt image header ({_one_line(exc)})") from exc

    with img:
        width, height = img.size
        _check_declared_size(name, width, height, max_pixels)

        # --- decode the first frame completely ---
        try:
            if max_side is not None and img.format in ("JPEG", "MPO") and max(width, height) > max_side:
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still leaves at least the
                # requested size: a 50 MP photo requested at 1024 px then costs a fraction of the
                # memory and time. Lanczos below does the final, exact resize.
                img.draft(None, _fit_longer_side(width, height, max_side))
            img.load()
        except Image.DecompressionBombError as exc:
            raise _too_large(name, exc, max_pixels) from exc
        except Exception as exc:
            raise _fail(name, f"truncated or corrupt image data ({_one_line(exc)})") from exc

        # --- orientation ---
        try:
            # in_place avoids copying the whole image when there is nothing to rotate.
            ImageOps.exif_transpose(img, in_place=True)
        except Exception as exc:  # corrupt EXIF: the pixels are fine, the rotation is unknown
            _log.warning("%s: ignoring unreadable EXIF orientation (%s)", name, _one_line(exc))

        # --- colour ---
        try:
            rgb = _to_rgb_image(img)
        except ImageError as exc:
            raise _fail(name, str(exc)) from exc
        except Exception as exc:
            raise _fail(name, f"cannot convert pixel mode {img.mode!r} to RGB ({_one_line(exc)})") from exc

        # --- size ---
        if max_side is not None and max(width, height) > max_side:
            # The target comes from the file's full size, not the JPEG draft's reduced one, so
            # the output size never depends on how the decoder took its shortcut.
            target = _fit_longer_side(width, height, max_side)
            if (rgb.size[0] > rgb.size[1]) != (target[0] > target[1]) and rgb.size[0] != rgb.size[1]:
                target = (target[1], target[0])  # EXIF rotated the image by 90 degrees
            rgb = rgb.resize(target, Image.Resampling.LANCZOS)

        out = np.array(rgb, dtype=np.uint8)  # a fresh, writable, C-contiguous copy
    if out.ndim != 3 or out.shape[2] != 3:  # pragma: no cover - guards our own conversion code
        raise _fail(name, f"internal error: decoded to shape {out.shape}")
    return out


def _check_declared_size(name: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise _fail(
            name,
            f"image too large: declared {width}x{height} = {width * height} pixels exceeds the "
            f"limit of {max_pixels} (--max-pixels; refused before decoding)",
        )
    if min(width, height) < MIN_SIDE:
        raise _fail(name, f"image too small: {width}x{height} pixels, need at least {MIN_SIDE} on each side")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise _fail(
            name, f"absurd aspect ratio: {width}x{height} pixels is more elongated than {MAX_ASPECT}:1"
        )


def _too_large(name: str, exc: Exception, max_pixels: int) -> ImageError:
    """Pillow's own bomb guard fired (it runs inside ``Image.open``, before our check can see
    the size): report it against jaxdream's limit, the one the user can change."""
    match = _PILLOW_BOMB.search(str(exc))
    if match is None:
        return _fail(name, f"image too large: exceeds the limit of {max_pixels} pixels "
                           f"(--max-pixels; refused before decoding)")
    declared, pillow_limit = int(match.group(1)), int(match.group(2))
    if declared > max_pixels:
        return _fail(name, f"image too large: declared {declared} pixels exceeds the limit of "
                           f"{max_pixels} (--max-pixels; refused before decoding)")
    return _fail(name, f"image too large: declared {declared} pixels, more than the decoder "
                       f"(Pillow) allows ({pillow_limit}), even though --max-pixels is "
                       f"{max_pixels}; refused before decoding")


def _check_file_size(fp: IO[bytes], name: str, max_file_bytes: int) -> None:
    if isinstance(fp, io.BytesIO):  # an object already read into memory (a bucket, a URL)
        size = len(fp.getbuffer())
    else:
        size = os.fstat(fp.fileno()).st_size
    if size > max_file_bytes:
        raise _fail(name, f"file too large: {size} bytes exceeds the limit of {max_file_bytes} "
                          f"(max_file_bytes; refused before reading)")


def _check_jpeg_metadata(fp: IO[bytes], name: str) -> None:
    """Walk a JPEG's segment headers up to the image data (seeking over their contents) and
    refuse one whose metadata exceeds MAX_JPEG_METADATA_BYTES or MAX_JPEG_EXIF_BYTES. Files that
    are not JPEG, or whose structure breaks off, are left to the decoder to judge."""
    totals = {"metadata": 0, "EXIF": 0}
    limits = {"metadata": MAX_JPEG_METADATA_BYTES, "EXIF": MAX_JPEG_EXIF_BYTES}
    segments = {"metadata": 0, "EXIF": 0}
    try:
        if fp.read(2) != b"\xff\xd8":
            return
        for _ in range(_MAX_JPEG_SEGMENTS):
            header = fp.read(4)
            if len(header) < 4 or header[0] != 0xFF:
                return
            marker, length = header[1], int.from_bytes(header[2:4], "big")
            if marker in (0xD9, 0xDA) or length < 2:  # end of image, start of scan: done
                return
            skip = length - 2
            if 0xE0 <= marker <= 0xEF or marker == 0xFE:
                kinds = ["metadata"]
                if marker == 0xE1 and skip >= 6:
                    skip -= 6
                    if fp.read(6) == b"Exif\0\0":
                        kinds.append("EXIF")
                for kind in kinds:
                    totals[kind] += length
                    segments[kind] += 1
                    if totals[kind] > limits[kind]:
                        raise _fail(name, f"too much JPEG {kind}: over {limits[kind]} bytes "
                                          f"in its first {segments[kind]} segments; refused "
                                          f"before decoding")
            fp.seek(skip, os.SEEK_CUR)
        raise _fail(name, f"more than {_MAX_JPEG_SEGMENTS} JPEG segments before the image "
                          f"data (a real photo has a few dozen); refused before decoding")
    except OSError:
        return
    finally:
        fp.seek(0)


def _fit_longer_side(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size with the longer side equal to ``max_side``, aspect kept (rounded), no side below 1."""
    if width >= height:
        return max_side, max(1, (height * max_side + width // 2) // width)
    return max(1, (width * max_side + height // 2) // height), max_side


def _to_rgb_image(img: Image.Image) -> Image.Image:
    """Convert any supported Pillow mode to an 8-bit ``RGB`` image (see :func:`load_rgb`)."""
    mode = img.mode
    if mode in _MODES_16BIT or mode in ("I", "F"):
        return Image.fromarray(_gray_to_uint8(np.asarray(img), mode)).convert("RGB")
    if mode in _MODES_WITH_ALPHA or (mode in _MODES_PLAIN and "transparency" in img.info):
        # Transparent pixels are composited over white rather than dropped: converting RGBA
        # straight to RGB would expose whatever colour happens to be stored under alpha = 0
        # (often black, sometimes garbage), and DeepDream would then amplify those invisible
        # artefacts. White is what a viewer shows on a default page, and what logos, stickers
        # and scanned drawings with transparent backgrounds are designed against.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _MODES_PLAIN:
        # CMYK uses Pillow's naive conversion (no ICC profile); Adobe's inverted CMYK JPEGs
        # are already un-inverted by Pillow's JPEG reader.
        return img.convert("RGB")
    raise ImageError(f"unsupported pixel mode {mode!r}")


def _gray_to_uint8(samples: np.ndarray, mode: str) -> np.ndarray:
    """Map one-channel 16-bit / 32-bit / float samples to 0..255 ``uint8`` (scaling, not clipping)."""
    if mode == "F":
        values = np.nan_to_num(samples.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and float(values.min()) >= 0.0 and float(values.max()) <= 1.0:
            values *= 255.0
        return to_uint8(values)
    if mode == "I":
        samples = np.clip(samples, 0, 65535)
    # round(v * 255 / 65535) in exact integer arithmetic: 0 -> 0, 65535 -> 255, 257*k -> k.
    # uint32 is wide enough (65535 * 255 + 32767 < 2**24) and half the memory of int64.
    wide = samples.astype(np.uint32)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Conversion helpers


def to_uint8(x: Any) -> np.ndarray:
    """Convert a float image in 0..255 to ``uint8`` by rounding (half to even) and clipping.

    Any array-like works (NumPy or JAX arrays); the shape is kept. NaN becomes 0 and infinities
    saturate, so a diverged render still produces a viewable (if odd) image instead of the
    undefined result (and NumPy warning) of casting NaN to an integer.
    """
    arr = np.asarray(x)
    if arr.dtype == np.uint8:
        return arr.copy()
    if arr.dtype.kind in "biu":
        return np.asarray(np.clip(arr, 0, 255), dtype=np.uint8)
    if arr.dtype.kind != "f":
        raise TypeError(f"to_uint8 expects a real-valued array, got dtype {arr.dtype}")
    arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
    return np.asarray(np.rint(np.clip(arr, 0.0, 255.0)), dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Saving


def save_png(path: str | os.PathLike[str], image: np.ndarray, recipe: dict[str, Any]) -> None:
    """Write ``image`` as a PNG that carries ``recipe``, replacing ``path`` atomically.

    The recipe is stored as ``json.dumps(recipe, sort_keys=True)`` in a text chunk with keyword
    :data:`RECIPE_KEY`, so every output says how it was made (see :func:`read_recipe`). The
    bytes are deterministic for the same inputs: no timestamp, no DPI, fixed compression.

    Atomicity: the PNG is written to a hidden temporary file (``.<name>.<random>.tmp``) in the
    destination's directory, flushed and ``fsync``-ed, then renamed over ``path`` with
    :func:`os.replace`. Readers (and a crash) therefore see either the old file or the complete
    new one, never a partial PNG. On any failure the temporary file is removed and an existing
    destination is left untouched.

    Raises:
        ImageError: the file cannot be written (missing directory, permissions, disk full...).
        TypeError / ValueError: ``image`` is not an ``(H, W, 3) uint8`` array, or ``recipe`` is
            not JSON-serialisable, contains NaN/infinity, or exceeds :data:`MAX_RECIPE_BYTES`.
            These are caller bugs and are raised before anything touches the disk.
    """
    name = _display(path)
    encode = _png_encoder(image, recipe)
    try:
        atomic_write(path, encode)
    except OSError as exc:
        raise _fail(name, f"cannot write PNG ({_one_line(exc.strerror or exc)})") from exc


def png_bytes(image: np.ndarray, recipe: dict[str, Any]) -> bytes:
    """The bytes :func:`save_png` would write: for a store written in whole objects."""
    buffer = io.BytesIO()
    _png_encoder(image, recipe)(buffer)
    return buffer.getvalue()


def _png_encoder(image: np.ndarray, recipe: dict[str, Any]) -> Callable[[IO[bytes]], None]:
    """Checks ``image`` and ``recipe`` (caller bugs raise before anything is written) and
    returns what writes the PNG to a binary file."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"save_png expects a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"save_png expects an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
    text = json.dumps(recipe, sort_keys=True, allow_nan=False)
    if len(text) > MAX_RECIPE_BYTES:  # ASCII (json.dumps escapes the rest), so chars == bytes
        raise ValueError(f"recipe is {len(text)} bytes as JSON, more than {MAX_RECIPE_BYTES}")
    info = PngInfo()
    info.add_text(RECIPE_KEY, text)  # ASCII JSON, so Pillow writes a plain tEXt chunk
    pil = Image.fromarray(np.ascontiguousarray(image))
    return lambda out: pil.save(out, format="PNG", pnginfo=info, compress_level=6,
                                optimize=False)



# --------------------------------------------------------------------------------------------
# Reading the recipe back


def read_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the recipe stored by :func:`save_png` in the PNG at ``path``.

    The PNG chunks are walked directly (pixel data is skipped, not decoded), so this is cheap
    even for large renders. Text chunks of the ``tEXt``, ``zTXt`` and ``iTXt`` kinds are
    accepted, with decompression bounded by :data:`MAX_RECIPE_BYTES`.

    Raises:
        ImageError: the file is missing or not a PNG, is truncated or has a bad chunk CRC, has no
            (or more than one) ``jaxdream`` chunk, or the chunk is not a JSON object.
    """
    name = _display(path)
    with _open_regular_file(path, name) as fp:
        try:
            size = os.fstat(fp.fileno()).st_size
            texts = _find_recipe_chunks(fp, name, size)
        except OSError as exc:
            raise _fail(name, f"cannot read ({_one_line(exc.strerror or exc)})") from exc
    if not texts:
        raise _fail(name, f"no {RECIPE_KEY!r} recipe chunk in this PNG")
    if len(texts) > 1:
        raise _fail(name, f"{len(texts)} {RECIPE_KEY!r} recipe chunks; expected exactly one")

    def _reject_constant(token: str) -> Any:
        raise ValueError(f"non-standard JSON constant {token}")

    try:
        recipe = json.loads(texts[0], parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise _fail(name, f"recipe chunk is not valid JSON ({_one_line(exc)})") from exc
    if not isinstance(recipe, dict):
        raise _fail(name, f"recipe chunk holds a JSON {type(recipe).__name__}, not an object")
    return recipe


def _find_recipe_chunks(fp: IO[bytes], name: str, size: int) -> list[str]:
    if fp.read(8) != _PNG_SIGNATURE:
        raise _fail(name, "not a PNG file")
    key = RECIPE_KEY.encode("latin-1")
    found: list[str] = []
    position = 8
    while True:
        header = fp.read(8)
        if len(header) < 8:
            raise _fail(name, "truncated PNG (ends before the IEND chunk)")
        length, ctype = struct.unpack(">I4s", header)
        position += 8
        if length > 0x7FFFFFFF or position + length + 4 > size:
            kind = _one_line(ctype.decode("latin-1"))
            raise _fail(name, f"truncated or corrupt PNG (chunk {kind!r} claims {length} bytes)")
        if ctype in (b"tEXt", b"zTXt", b"iTXt"):
            prefix = fp.read(min(length, len(key) + 1))
            if prefix == key + b"\0":
                if length > MAX_RECIPE_BYTES + 1024:
                    raise _fail(name, f"recipe chunk is {length} bytes, more than {MAX_RECIPE_BYTES}")
                data = prefix + fp.read(length - len(prefix))
                crc = fp.read(4)
                if len(data) != length or len(crc) != 4:
                    raise _fail(name, "truncated PNG")
                if struct.unpack(">I", crc)[0] != zlib.crc32(ctype + data) & 0xFFFFFFFF:
                    raise _fail(name, f"corrupt PNG ({ctype.decode()} recipe chunk fails its CRC)")
                found.append(_decode_text_chunk(ctype, data[len(key) + 1 :], name))
            else:
                fp.seek(length - len(prefix) + 4, os.SEEK_CUR)
        else:
            fp.seek(length + 4, os.SEEK_CUR)
        position += length + 4
        if ctype == b"IEND":
            return found


def _decode_text_chunk(ctype: bytes, body: bytes, name: str) -> str:
    """Text of a tEXt / zTXt / iTXt chunk body (after ``keyword\\0``)."""
    try:
        if ctype == b"tEXt":
            return body.decode("latin-1")
        if ctype == b"zTXt":
            if body[:1] != b"\0":
                raise ValueError("unknown compression method")
            return _inflate(body[1:]).decode("latin-1")
        # iTXt: compression flag, method, language tag \0, translated keyword \0, text
        flag, method = body[0], body[1]
        rest = body[2:]
        _lang, _, rest = rest.partition(b"\0")
        _tkey, _, rest = rest.partition(b"\0")
        if flag == 1:
            if method != 0:
                raise ValueError("unknown compression method")
            rest = _inflate(rest)
        elif flag != 0:
            raise ValueError("bad compression flag")
        return rest.decode("utf-8")
    except (ValueError, IndexError, zlib.error) as exc:  # UnicodeDecodeError is a ValueError
        raise _fail(name, f"corrupt recipe chunk ({_one_line(exc)})") from exc


def _inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, MAX_RECIPE_BYTES + 1)
    if len(out) > MAX_RECIPE_BYTES:
        raise ValueError(f"decompresses to more than {MAX_RECIPE_BYTES} bytes")
    if not inflater.eof:
        raise ValueError("incomplete compressed data")
    return out
