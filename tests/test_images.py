"""Tests for jaxdream.images: loading anything a user throws at it, and atomic PNG output."""

from __future__ import annotations

import ast
import io
import json
import os
import struct
import sys
import tempfile
import time
import warnings
import zlib
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, PngImagePlugin

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hostile_images
from hostile_images import HostileCase, encode, make_corpus, png_chunk, raw_png

from jaxdream import images
from jaxdream.errors import ImageError, JaxdreamError
from jaxdream.images import load_rgb, read_recipe, save_png, to_uint8

# Any warning (ours, NumPy's, Pillow's escaping load_rgb) is a failure here, whatever -W says.
pytestmark = pytest.mark.filterwarnings("error")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def shown(path: Path) -> str:
    """How load_rgb prints a path: non-printable characters escaped."""
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(path)
    )


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------
# The hostile corpus

with tempfile.TemporaryDirectory() as _scratch:  # only to learn the case names at collection time
    CASE_NAMES = [case.path.name for case in make_corpus(Path(_scratch) / "corpus")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, HostileCase]:
    return {case.path.name: case for case in make_corpus(tmp_path_factory.mktemp("corpus"))}


def test_corpus_is_big_and_mixed() -> None:
    assert len(CASE_NAMES) >= 25
    assert len(set(CASE_NAMES)) == len(CASE_NAMES)


@pytest.mark.parametrize("name", CASE_NAMES, ids=[ascii(n).strip("'") for n in CASE_NAMES])
def test_corpus_case(corpus: dict[str, HostileCase], name: str) -> None:
    case = corpus[name]
    if case.should_load:
        image = load_rgb(case.path)
        assert image.dtype == np.uint8
        assert image.shape == (*case.expected_shape, 3), case.description
        assert image.flags.c_contiguous and image.flags.writeable
        if case.expected_corner is not None:
            diff = np.abs(image[0, 0].astype(int) - np.array(case.expected_corner))
            assert diff.max() <= case.tolerance, (case.description, image[0, 0], case.expected_corner)
    else:
        with pytest.raises(ImageError) as info:  # any other exception type fails the test
            load_rgb(case.path)
        message = str(info.value)
        assert message.startswith(shown(case.path) + ": "), message
        assert "\n" not in message and "\x1b" not in message
        assert len(message) < 400 + len(str(case.path))
        if case.reason is not None:
            assert case.reason.lower() in message.lower(), (case.description, message)


def test_corpus_script_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert hostile_images.main(["hostile_images.py", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(CASE_NAMES)
    assert all(line.startswith(("LOAD", "REFUSE")) for line in lines)


def test_permission_denied_is_an_image_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The corpus' chmod-000 case cannot fail as root (root reads anything), so fake the OS answer.
    path = write(tmp_path / "locked.png", encode(Image.new("RGB", (32, 32)), "PNG"))

    def deny(*args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(images.os, "open", deny)
    with pytest.raises(ImageError, match=r"locked\.png: permission denied"):
        load_rgb(path)


def test_examples_load() -> None:
    shapes = {"chelsea.jpg": (300, 451, 3), "coffee.jpg": (400, 600, 3), "astronaut.jpg": (512, 512, 3)}
    for name, shape in shapes.items():
        assert load_rgb(EXAMPLES / name).shape == shape
    assert sum(p.stat().st_size for p in EXAMPLES.glob("*.jpg")) < 300_000


def test_path_types_and_image_error_hierarchy(tmp_path: Path) -> None:
    path = write(tmp_path / "a.png", encode(Image.new("RGB", (20, 20), (1, 2, 3)), "PNG"))
    assert load_rgb(str(path)).shape == load_rgb(path).shape == (20, 20, 3)
    assert issubclass(ImageError, JaxdreamError)
    with pytest.raises(ImageError, match="invalid path"):
        load_rgb("bad\0name.png")


# ---------------------------------------------------------------------------------------------
# Colour conversions


def test_16bit_gray_scales_without_clipping(tmp_path: Path) -> None:
    values = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)
    image = load_rgb(write(tmp_path / "g16.png", encode(Image.fromarray(values), "PNG")))
    expected = np.round(values.astype(np.float64) / 257.0).astype(np.uint8)
    assert np.array_equal(image[..., 0], expected)
    assert np.array_equal(image[..., 0], image[..., 2])
    full = load_rgb(
        write(tmp_path / "max.png", encode(Image.fromarray(np.full((16, 16), 65535, np.uint16)), "PNG"))
    )
    assert (full == 255).all()


def test_alpha_is_composited_over_white(tmp_path: Path) -> None:
    rgba = np.zeros((16, 32, 4), np.uint8)
    rgba[:, :16] = (200, 10, 10, 0)  # transparent (its colour must not show)
    rgba[:, 16:] = (200, 10, 10, 255)  # opaque
    image = load_rgb(write(tmp_path / "a.png", encode(Image.fromarray(rgba), "PNG")))
    assert (image[:, :16] == 255).all()
    assert (image[:, 16:] == (200, 10, 10)).all()


def test_cmyk_cyan_becomes_cyan(tmp_path: Path) -> None:
    image = load_rgb(write(tmp_path / "c.jpg", encode(Image.new("CMYK", (32, 32), (255, 0, 0, 0)), "JPEG")))
    assert np.abs(image.astype(int) - (0, 255, 255)).max() <= 8


def test_palette_transparency_and_one_bit(tmp_path: Path) -> None:
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    pal.putpixel((0, 0), 1)
    image = load_rgb(write(tmp_path / "p.png", encode(pal, "PNG", transparency=0)))
    assert tuple(image[0, 0]) == (40, 50, 60)
    assert (image[1:, 1:] == 255).all()
    bits = Image.new("1", (16, 16), 0)
    bits.putpixel((3, 3), 1)
    image = load_rgb(write(tmp_path / "b.png", encode(bits, "PNG")))
    assert tuple(image[3, 3]) == (255, 255, 255) and tuple(image[0, 0]) == (0, 0, 0)


def test_float_images(tmp_path: Path) -> None:
    unit = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    image = load_rgb(write(tmp_path / "u.tif", encode(Image.fromarray(unit), "TIFF")))
    assert image[0, 0, 0] == 0 and image[-1, -1, 0] == 255
    wide = np.full((16, 16), 300.0, np.float32)
    wide[0, 0] = np.nan
    wide[0, 1] = 100.0
    image = load_rgb(write(tmp_path / "w.tif", encode(Image.fromarray(wide), "TIFF")))
    assert image[0, 0, 0] == 0 and image[0, 1, 0] == 100 and image[5, 5, 0] == 255


# ---------------------------------------------------------------------------------------------
# EXIF orientation

# Where the stored top-left corner ends up for each EXIF orientation, and whether W/H swap.
ORIENTATIONS = {
    1: ("tl", False),
    2: ("tr", False),
    3: ("br", False),
    4: ("bl", False),
    5: ("tl", True),
    6: ("tr", True),
    7: ("br", True),
    8: ("bl", True),
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation(tmp_path: Path, orientation: int) -> None:
    stored = Image.new("RGB", (40, 20), (128, 128, 128))
    stored.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = write(tmp_path / f"o{orientation}.jpg", encode(stored, "JPEG", quality=95, exif=exif.tobytes()))
    image = load_rgb(path)
    corner, swapped = ORIENTATIONS[orientation]
    assert image.shape == ((40, 20, 3) if swapped else (20, 40, 3))
    h, w = image.shape[:2]
    spots = {"tl": (2, 2), "tr": (2, w - 3), "bl": (h - 3, 2), "br": (h - 3, w - 3)}
    for where, (y, x) in spots.items():
        is_red = image[y, x, 0] > 200 and image[y, x, 1] < 60
        assert is_red == (where == corner), (orientation, where, image[y, x])


def test_exif_orientation_6_turns_40x20_into_20x40(tmp_path: Path) -> None:
    case_dir = tmp_path / "c"
    case = next(c for c in make_corpus(case_dir) if c.path.name == "exif_orientation6.jpg")
    image = load_rgb(case.path)
    assert image.shape == (40, 20, 3)  # 20 wide, 40 high
    assert image[2, 17, 0] > 200 and image[2, 17, 1] < 60  # red now at the top-right
    assert image[2, 2, 0] < 160  # and not at the top-left any more


# ---------------------------------------------------------------------------------------------
# Size limits


def test_max_side_downscales_keeping_aspect(tmp_path: Path) -> None:
    path = write(tmp_path / "big.png", encode(Image.new("RGB", (600, 400), (50, 60, 70)), "PNG"))
    assert load_rgb(path, max_side=300).shape == (200, 300, 3)
    assert load_rgb(path, max_side=601).shape == (400, 600, 3)  # never upscaled
    assert load_rgb(path, max_side=600).shape == (400, 600, 3)
    assert load_rgb(path, max_side=7).shape == (5, 7, 3)
    tall = write(tmp_path / "tall.png", encode(Image.new("RGB", (16, 512), (1, 1, 1)), "PNG"))
    assert load_rgb(tall, max_side=20).shape == (20, 1, 3)  # each side at least 1
    assert load_rgb(tall, max_side=1).shape == (1, 1, 3)


def test_max_side_on_jpeg_matches_full_decode(tmp_path: Path) -> None:
    # JPEGs are decoded at a reduced DCT scale first; the result must match a full decode closely.
    gradient = np.linspace(0, 255, 1600 * 3).reshape(1, 1600, 3).repeat(800, axis=0).astype(np.uint8)
    jpg = write(tmp_path / "g.jpg", encode(Image.fromarray(gradient), "JPEG", quality=95))
    png = write(tmp_path / "g.png", encode(Image.fromarray(load_rgb(jpg)), "PNG"))
    small_jpg, small_png = load_rgb(jpg, max_side=200), load_rgb(png, max_side=200)
    assert small_jpg.shape == small_png.shape == (100, 200, 3)
    assert np.abs(small_jpg.astype(int) - small_png).mean() < 2.0


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "100"])
def test_invalid_limits_are_value_errors(tmp_path: Path, bad: object) -> None:
    path = write(tmp_path / "a.png", encode(Image.new("RGB", (20, 20)), "PNG"))
    with pytest.raises(ValueError):
        load_rgb(path, max_side=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        load_rgb(path, max_pixels=bad)  # type: ignore[arg-type]


def test_max_pixels_is_checked_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "a.png", encode(Image.new("RGB", (100, 100)), "PNG"))
    assert load_rgb(path, max_pixels=10_000).shape == (100, 100, 3)

    def no_decoding(self: object) -> None:
        raise AssertionError("decoded a refused image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError, match=r"a\.png: image too large: declared 100x100 = 10000 pixels"):
        load_rgb(path, max_pixels=9_999)


def test_pillow_bomb_warning_does_not_escape_or_change_global_state(tmp_path: Path) -> None:
    # 10000 x 10000 (100 MP) is past Pillow's *warning* threshold (89 MP) but below its error
    # threshold; with our limit raised, the header passes and the (fake) pixel data fails.
    path = write(
        tmp_path / "big.png",
        raw_png(10_000, 10_000, bit_depth=1, color_type=0, idat=zlib.compress(b"\0" * 8)),
    )
    before = (Image.MAX_IMAGE_PIXELS, list(warnings.filters), ImageFile.LOAD_TRUNCATED_IMAGES)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_rgb(path, max_pixels=200_000_000)
    with pytest.raises(ImageError, match="too large"):
        load_rgb(path)
    assert (Image.MAX_IMAGE_PIXELS, list(warnings.filters), ImageFile.LOAD_TRUNCATED_IMAGES) == before


def test_pillow_warnings_about_the_file_are_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    case = next(c for c in make_corpus(tmp_path / "c") if c.path.name == "corrupt_exif.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = load_rgb(case.path)
    assert image.shape == (32, 32, 3)
    assert any("corrupt_exif.jpg" in r.getMessage() for r in caplog.records)


def test_module_does_not_import_jax() -> None:
    tree = ast.parse(Path(images.__file__).read_text(encoding="utf-8"))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {
        (node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
    }
    assert not imported & {"jax", "jaxlib", "flax", "optax"}


# ---------------------------------------------------------------------------------------------
# to_uint8


def test_to_uint8_rounds_and_clips() -> None:
    x = np.array([0.4, 0.5, 0.6, 1.5, 127.49, 254.5, 255.4, 300.0, -5.0, np.nan, np.inf, -np.inf])
    assert to_uint8(x).tolist() == [0, 0, 1, 2, 127, 254, 255, 255, 0, 0, 255, 0]
    assert to_uint8(x).dtype == np.uint8
    img = np.full((4, 5, 3), 99.7, np.float32)
    assert to_uint8(img).shape == (4, 5, 3) and (to_uint8(img) == 100).all()
    assert to_uint8(np.array([-1, 7, 999])).tolist() == [0, 7, 255]
    u = np.array([1, 2], np.uint8)
    assert to_uint8(u).tolist() == [1, 2] and to_uint8(u) is not u
    with pytest.raises(TypeError):
        to_uint8(np.array(["a"]))


# ---------------------------------------------------------------------------------------------
# save_png / read_recipe

RECIPE = {
    "octaves": 4,
    "layers": ["mixed4c", "mixed5a"],
    "scale": 1.4,
    "name": "kätzchen 猫",
    "nested": {"b": 1, "a": None},
}


def noise(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_save_and_read_round_trip(tmp_path: Path) -> None:
    image = noise()
    path = tmp_path / "out.png"
    save_png(path, image, RECIPE)
    assert read_recipe(path) == RECIPE
    assert np.array_equal(load_rgb(path), image)
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.text["jaxdream"] == json.dumps(RECIPE, sort_keys=True)
    assert leftovers(tmp_path) == []


def test_save_is_deterministic(tmp_path: Path) -> None:
    image = noise(seed=5)
    save_png(tmp_path / "a.png", image, RECIPE)
    save_png(tmp_path / "b.png", image, dict(reversed(list(RECIPE.items()))))  # key order irrelevant
    save_png(tmp_path / "a.png", image, RECIPE)  # overwrite gives the same bytes again
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert b"tIME" not in (tmp_path / "a.png").read_bytes()


def test_saved_file_gets_normal_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        save_png(tmp_path / "p.png", noise(), {})
    finally:
        os.umask(old)
    assert (tmp_path / "p.png").stat().st_mode & 0o777 == 0o644


def _failing_encoder(error: BaseException):
    def encoder(im: Image.Image, fp: io.IOBase, filename: str | bytes) -> None:
        fp.write(b"\x89PNG\r\n\x1a\n partial")  # something reached the temp file before the failure
        raise error

    return encoder


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("error", [RuntimeError("encoder bug"), OSError(28, "No space left on device")])
def test_save_is_atomic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool, error: BaseException
) -> None:
    dest = tmp_path / "render.png"
    if existing:
        save_png(dest, noise(seed=1), {"old": True})
    before = dest.read_bytes() if existing else None
    monkeypatch.setitem(Image.SAVE, "PNG", _failing_encoder(error))
    expected = ImageError if isinstance(error, OSError) else RuntimeError
    with pytest.raises(expected) as info:
        save_png(dest, noise(seed=2), {"new": True})
    if expected is ImageError:
        assert str(info.value) == f"{dest}: cannot write PNG (No space left on device)"
    assert leftovers(tmp_path) == []
    if existing:
        assert dest.read_bytes() == before
        assert read_recipe(dest) == {"old": True}
    else:
        assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["render.png"] if existing else [])


def test_save_failure_at_rename_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "r.png"
    save_png(dest, noise(seed=1), {"v": 1})

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(images.os, "replace", broken_replace)
    with pytest.raises(ImageError, match="cannot write PNG"):
        save_png(dest, noise(seed=2), {"v": 2})
    assert leftovers(tmp_path) == [] and read_recipe(dest) == {"v": 1}


def test_temp_file_name_is_hidden_and_in_same_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        seen.append(src)
        real_replace(src, dst)

    monkeypatch.setattr(images.os, "replace", spy)
    save_png(tmp_path / "x.png", noise(), {})
    (src,) = seen
    assert Path(src).parent == tmp_path
    assert Path(src).name.startswith(".") and src.endswith(".tmp")


def test_save_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"missing/out\.png: cannot write PNG"):
        save_png(tmp_path / "missing" / "out.png", noise(), {})
    for bad in (noise().astype(np.float32), noise()[..., :2], np.zeros((0, 4, 3), np.uint8), [[1, 2, 3]]):
        with pytest.raises((TypeError, ValueError)):
            save_png(tmp_path / "bad.png", bad, {})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        save_png(tmp_path / "bad.png", noise(), {"x": float("nan")})
    with pytest.raises(TypeError):
        save_png(tmp_path / "bad.png", noise(), {"x": object()})
    with pytest.raises(ValueError):
        save_png(tmp_path / "bad.png", noise(), {"x": "a" * (images.MAX_RECIPE_BYTES + 1)})
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _png_with_text(chunks: bytes) -> bytes:
    rows = b"".join(b"\0" + b"\x80" * 16 for _ in range(16))
    return raw_png(16, 16, bit_depth=8, color_type=0, idat=zlib.compress(rows), extra=chunks)


def test_read_recipe_accepts_compressed_chunks(tmp_path: Path) -> None:
    text = json.dumps(RECIPE, sort_keys=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("jaxdream", text, zip=True)  # zTXt
    z = write(tmp_path / "z.png", encode(Image.new("RGB", (16, 16)), "PNG", pnginfo=info))
    assert read_recipe(z) == RECIPE
    info = PngImagePlugin.PngInfo()
    info.add_itxt("jaxdream", json.dumps(RECIPE, ensure_ascii=False), zip=True)  # compressed iTXt
    i = write(tmp_path / "i.png", encode(Image.new("RGB", (16, 16)), "PNG", pnginfo=info))
    assert read_recipe(i) == RECIPE


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (encode(Image.new("RGB", (16, 16)), "JPEG"), "not a PNG file"),
        (encode(Image.new("RGB", (16, 16)), "PNG"), "no 'jaxdream' recipe chunk"),
        (_png_with_text(png_chunk(b"tEXt", b"jaxdream\0{bad json")), "not valid JSON"),
        (_png_with_text(png_chunk(b"tEXt", b"jaxdream\0[1, 2]")), "JSON list, not an object"),
        (_png_with_text(png_chunk(b"tEXt", b'jaxdream\0{"x": NaN}')), "not valid JSON"),
        (_png_with_text(png_chunk(b"tEXt", b"jaxdream\0" + b"[" * 200_000)), "not valid JSON"),
        (_png_with_text(png_chunk(b"tEXt", b"jaxdream\0{}") * 2), "2 'jaxdream' recipe chunks"),
        (_png_with_text(png_chunk(b"zTXt", b"jaxdream\0\0" + zlib.compress(b" " * 5_000_000))), "more than"),
        (_png_with_text(png_chunk(b"zTXt", b"jaxdream\0\0garbage")), "corrupt recipe chunk"),
        (_png_with_text(png_chunk(b"iTXt", b"jaxdream\0\0\0\0\0\xff\xfe")), "corrupt recipe chunk"),
        (_png_with_text(png_chunk(b"tEXt", b"jaxdream\0{}"))[:-20], "truncated"),
        (b"\x89PNG\r\n\x1a\n" + struct.pack(">I4s", 0xFFFFFFF0, b"tEXt"), "truncated or corrupt PNG"),
        (b"", "empty file"),
    ],
    ids=[
        "jpeg",
        "no-chunk",
        "bad-json",
        "list",
        "nan",
        "deep-nesting",
        "duplicate",
        "zbomb",
        "bad-zlib",
        "bad-utf8",
        "truncated",
        "huge-length",
        "empty",
    ],
)
def test_read_recipe_errors(tmp_path: Path, data: bytes, reason: str) -> None:
    path = write(tmp_path / "r.png", data)
    with pytest.raises(ImageError) as info:
        read_recipe(path)
    assert str(info.value).startswith(f"{path}: ") and reason in str(info.value)


def test_read_recipe_detects_bad_crc(tmp_path: Path) -> None:
    data = bytearray(_png_with_text(png_chunk(b"tEXt", b'jaxdream\0{"a": 1}')))
    data[data.index(b'{"a"') + 6] ^= 0x01  # flip a bit in the text; CRC no longer matches
    with pytest.raises(ImageError, match="fails its CRC"):
        read_recipe(write(tmp_path / "c.png", bytes(data)))
    with pytest.raises(ImageError, match="no such file"):
        read_recipe(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="directory"):
        read_recipe(tmp_path)


# ---------------------------------------------------------------------------------------------
# Property tests: arbitrary bytes never escape as anything but ImageError

FUZZ = settings(
    max_examples=100,
    deadline=timedelta(milliseconds=2000),
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "fuzz.img"


def _seed_files() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    photo = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "png": encode(photo, "PNG"),
        "jpeg": encode(photo, "JPEG", quality=80, exif=exif.tobytes()),
        "gif": encode(photo.convert("P"), "GIF"),
        "tiff": encode(photo, "TIFF"),
    }


SEEDS = _seed_files()


def _load_or_image_error(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        image = load_rgb(path, max_side=64)
    except ImageError as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc)
    else:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


@FUZZ
@given(data=st.binary(max_size=2048))
def test_fuzz_random_bytes(fuzz_file: Path, data: bytes) -> None:
    _load_or_image_error(fuzz_file, data)


@FUZZ
@given(
    kind=st.sampled_from(sorted(SEEDS)),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.floats(0, 1)),
    insert=st.one_of(st.none(), st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=64))),
)
def test_fuzz_mutated_images(
    fuzz_file: Path,
    kind: str,
    edits: list[tuple[float, int]],
    cut: float | None,
    insert: tuple[float, bytes] | None,
) -> None:
    data = bytearray(SEEDS[kind])
    for where, value in edits:
        data[int(where * len(data))] = value
    if insert is not None:
        at = int(insert[0] * len(data))
        data[at:at] = insert[1]
    if cut is not None:
        del data[int(cut * len(data)) :]
    _load_or_image_error(fuzz_file, bytes(data))


@FUZZ
@given(
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.floats(0, 1)),
)
def test_fuzz_read_recipe(fuzz_file: Path, edits: list[tuple[float, int]], cut: float | None) -> None:
    buf = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    info.add_text("jaxdream", json.dumps(RECIPE, sort_keys=True))
    Image.new("RGB", (16, 16)).save(buf, "PNG", pnginfo=info)
    data = bytearray(buf.getvalue())
    for where, value in edits:
        data[int(where * len(data))] = value
    if cut is not None:
        del data[int(cut * len(data)) :]
    fuzz_file.write_bytes(bytes(data))
    try:
        recipe = read_recipe(fuzz_file)
    except ImageError:
        pass
    else:
        assert isinstance(recipe, dict)


# --- issue 17: bounded reads before decoding, and jaxdream's own pixel limit -----------------


def _jpeg_with_segments(segments: list[bytes]) -> bytes:
    """A valid 64x64 JPEG with ``segments`` (whole marker segments) inserted after SOI."""
    plain = encode(Image.new("RGB", (64, 64), (200, 30, 30)), "JPEG")
    return plain[:2] + b"".join(segments) + plain[2:]


def _app1(payload: bytes) -> bytes:
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


@pytest.mark.timeout(60)
def test_jpeg_with_60_mb_of_exif_is_refused_quickly(tmp_path: Path) -> None:
    """920 APP1 EXIF segments of 64 KB (60 MB): Pillow alone joins them quadratically (17 s)."""
    segment = _app1(b"Exif\0\0" + b"\0" * (65533 - 6))
    path = write(tmp_path / "exif.jpg", _jpeg_with_segments([segment] * 920))
    assert path.stat().st_size > 60_000_000
    started = time.perf_counter()
    with pytest.raises(ImageError, match=r"exif\.jpg: too much JPEG EXIF: over 1048576 bytes"):
        load_rgb(path)
    assert time.perf_counter() - started < 1.0


@pytest.mark.timeout(60)
def test_jpeg_with_too_many_segments_or_too_much_metadata_is_refused(tmp_path: Path) -> None:
    comments = write(tmp_path / "com.jpg", _jpeg_with_segments([b"\xff\xfe\x00\x02"] * 5000))
    with pytest.raises(ImageError, match=r"com\.jpg: more than 4096 JPEG segments"):
        load_rgb(comments)
    xmp = _app1(b"http://ns.adobe.com/xap/1.0/\0" + b" " * 65000)
    heavy = write(tmp_path / "xmp.jpg", _jpeg_with_segments([xmp] * 300))
    with pytest.raises(ImageError, match=r"xmp\.jpg: too much JPEG metadata: over 16777216"):
        load_rgb(heavy)


def test_jpeg_with_ordinary_metadata_still_loads(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    plain = encode(Image.new("RGB", (64, 32), (10, 200, 10)), "JPEG", exif=exif.tobytes())
    extra = [_app1(b"http://ns.adobe.com/xap/1.0/\0" + b" " * 60000), b"\xff\xfe\x00\x07hello"]
    path = write(tmp_path / "ok.jpg", plain[:2] + b"".join(extra) + plain[2:])
    assert load_rgb(path).shape == (64, 32, 3)  # rotated: the EXIF was still read


def test_file_size_limit_is_checked_before_reading(tmp_path: Path) -> None:
    path = write(tmp_path / "small.png", encode(Image.new("RGB", (32, 32)), "PNG"))
    size = path.stat().st_size
    assert load_rgb(path, max_file_bytes=size).shape == (32, 32, 3)
    with pytest.raises(ImageError, match=rf"small\.png: file too large: {size} bytes exceeds "
                                         rf"the limit of {size - 1}"):
        load_rgb(path, max_file_bytes=size - 1)
    sparse = tmp_path / "huge.jpg"  # 300 MB on paper, a few bytes on disk
    with open(sparse, "wb") as f:
        f.write(encode(Image.new("RGB", (32, 32)), "JPEG"))
        f.truncate(300 * 2**20)
    with pytest.raises(ImageError, match=r"huge\.jpg: file too large: 314572800 bytes exceeds "
                                         r"the limit of 268435456"):
        load_rgb(sparse)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="max_file_bytes"):
            load_rgb(path, max_file_bytes=bad)  # type: ignore[arg-type]


def test_pillow_bomb_limit_is_reported_as_jaxdreams_limit(tmp_path: Path) -> None:
    """2**31 x 1 trips Pillow's own guard inside Image.open; the message names --max-pixels."""
    path = write(tmp_path / "wide.png",
                 raw_png(2**31, 1, bit_depth=1, color_type=0, idat=zlib.compress(b"\0" * 8)))
    with pytest.raises(ImageError) as info:
        load_rgb(path)
    message = str(info.value)
    assert f"declared {2**31} pixels exceeds the limit of {images.DEFAULT_MAX_PIXELS}" in message
    assert "--max-pixels" in message
    assert "178956970" not in message
