"""A generated corpus of good-but-odd and outright hostile image files for ``load_rgb``.

Nothing here is committed as a binary: :func:`make_corpus` writes every file from code, with
fixed seeds, so the corpus is reproducible and reviewable. Good files cover every odd mode and
naming trick a user can throw at the loader; bad files cover what goes wrong in practice
(empty, truncated, mislabelled, corrupt) and what an attacker would try (decompression bombs,
special files, PostScript that would run Ghostscript).

Run as a script to inspect the corpus by hand::

    python tests/hostile_images.py OUTDIR
"""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, features


@dataclass(frozen=True)
class HostileCase:
    """One corpus file and what ``load_rgb`` must do with it.

    Attributes:
        path: the file (may be a symlink, directory, FIFO, ...).
        should_load: True if ``load_rgb`` must return an array, False if it must raise ImageError.
        description: what the case is and why it matters.
        expected_shape: for good cases, the ``(H, W)`` of the loaded array.
        expected_corner: for good cases, the RGB value expected at pixel ``[0, 0]``.
        tolerance: allowed absolute difference per channel for ``expected_corner`` (lossy codecs).
        reason: for bad cases, a substring the error message must contain.
    """

    path: Path
    should_load: bool
    description: str
    expected_shape: tuple[int, int] | None = None
    expected_corner: tuple[int, int, int] | None = None
    tolerance: int = 0
    reason: str | None = None


# ---------------------------------------------------------------------------------------------
# Byte-level helpers


def png_chunk(ctype: bytes, data: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    return (
        struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data) & 0xFFFFFFFF)
    )


def raw_png(
    width: int, height: int, *, bit_depth: int, color_type: int, idat: bytes, extra: bytes = b""
) -> bytes:
    """A PNG built by hand: header values are whatever we ask for, nothing is allocated."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + extra
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def iter_png_chunks(data: bytes) -> list[tuple[int, bytes, int]]:
    """(offset of the chunk's length field, type, data length) for every chunk of a PNG."""
    out = []
    pos = 8
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        out.append((pos, ctype, length))
        pos += 12 + length
    return out


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def noise_rgb(width: int, height: int, seed: int) -> Image.Image:
    """Incompressible content, so truncation and corruption land in the pixel data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def solid(mode: str, size: tuple[int, int], color: object) -> Image.Image:
    return Image.new(mode, size, color)  # type: ignore[arg-type]


def with_corner(img: Image.Image, color: object, box: int = 6) -> Image.Image:
    """``img`` with a ``box`` x ``box`` square of ``color`` at the top-left corner."""
    img = img.copy()
    img.paste(color, (0, 0, box, box))  # type: ignore[arg-type]
    return img


def _fresh(path: Path) -> Path:
    """Remove what an earlier run left at ``path`` so that re-running into a folder works."""
    if path.is_symlink() or path.is_file() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        path.rmdir()  # only ever our own empty x.png directory
    return path


def _can_read(path: Path) -> bool:
    try:
        with open(path, "rb"):
            return True
    except PermissionError:
        return False


# ---------------------------------------------------------------------------------------------
# The corpus


def make_corpus(folder: Path) -> list[HostileCase]:
    """Write the corpus into ``folder`` (created if needed) and return its cases."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cases: list[HostileCase] = []

    def good(
        name: str,
        data: bytes,
        description: str,
        shape: tuple[int, int],
        corner: tuple[int, int, int] | None = None,
        tolerance: int = 0,
    ) -> Path:
        path = _fresh(folder / name)
        path.write_bytes(data)
        cases.append(HostileCase(path, True, description, shape, corner, tolerance))
        return path

    def bad(name: str, data: bytes, description: str, reason: str | None) -> Path:
        path = _fresh(folder / name)
        path.write_bytes(data)
        cases.append(HostileCase(path, False, description, reason=reason))
        return path

    red, white = (255, 0, 0), (255, 255, 255)

    # ---------------- good files, odd modes ----------------
    rgb_png = good(
        "rgb.png",
        encode(with_corner(solid("RGB", (64, 48), (10, 20, 30)), red), "PNG"),
        "plain 8-bit RGB PNG (baseline)",
        (48, 64),
        red,
    )
    good("gray_L.png", encode(solid("L", (40, 30), 77), "PNG"), "8-bit grayscale (L)", (30, 40), (77, 77, 77))
    good(
        "gray_LA.png",
        encode(solid("LA", (40, 30), (0, 0)), "PNG"),
        "grayscale + alpha, fully transparent: composited over white",
        (30, 40),
        white,
    )
    good(
        "rgba_half.png",
        encode(solid("RGBA", (40, 30), (0, 0, 0, 128)), "PNG"),
        "RGBA, black at alpha 128 over white",
        (30, 40),
        (127, 127, 127),
        1,
    )
    pal = solid("P", (32, 32), 1)
    pal.putpalette([0, 255, 0] + [255, 0, 0] + [0, 0, 0] * 254)
    pal.info["transparency"] = 1
    good(
        "palette_trns.png",
        encode(pal, "PNG", transparency=1),
        "palette (P) with tRNS transparency: transparent index -> white",
        (32, 32),
        white,
    )
    pal2 = solid("P", (32, 32), 0)
    pal2.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    good("palette.gif", encode(pal2, "GIF"), "palette GIF without transparency", (32, 32), (0, 0, 255))
    good(
        "cmyk.jpg",
        encode(solid("CMYK", (48, 32), (255, 0, 0, 0)), "JPEG", quality=95),
        "CMYK JPEG, pure cyan",
        (32, 48),
        (0, 255, 255),
        8,
    )
    gray16 = Image.fromarray(np.full((24, 36), 65535, dtype=np.uint16))
    good("gray16.png", encode(gray16, "PNG"), "16-bit grayscale PNG (I;16), 65535 -> 255", (24, 36), white)
    mid16 = np.full((24, 36), 257 * 100, dtype=">u2").tobytes()
    good(
        "gray16_big_endian.tif",
        encode(Image.frombytes("I;16B", (36, 24), mid16), "TIFF"),
        "16-bit big-endian TIFF (I;16B), 25700 -> 100",
        (24, 36),
        (100, 100, 100),
    )
    rgb16_rows = b"".join(b"\0" + struct.pack(">HHH", 65535, 0, 32896) * 20 for _ in range(20))
    good(
        "rgb16.png",
        raw_png(20, 20, bit_depth=16, color_type=2, idat=zlib.compress(rgb16_rows)),
        "16-bit-per-channel RGB PNG, hand-built",
        (20, 20),
        (255, 0, 128),
    )
    good(
        "float.tif",
        encode(Image.fromarray(np.full((20, 30), 0.5, dtype=np.float32)), "TIFF"),
        "32-bit float TIFF (F) in 0..1, 0.5 -> 128",
        (20, 30),
        (128, 128, 128),
    )
    good(
        "int32.tif",
        encode(Image.fromarray(np.full((20, 30), 70000, dtype=np.int32)), "TIFF"),
        "32-bit integer TIFF (I) above 16-bit range: clipped to 65535 -> 255",
        (20, 30),
        white,
    )
    good("bilevel.png", encode(solid("1", (33, 17), 1), "PNG"), "1-bit black and white PNG", (17, 33), white)
    good(
        "gray.jpg",
        encode(solid("L", (40, 40), 200), "JPEG", quality=95),
        "grayscale JPEG",
        (40, 40),
        (200, 200, 200),
        2,
    )
    good(
        "progressive.jpg",
        encode(solid("RGB", (50, 40), (0, 128, 255)), "JPEG", quality=95, progressive=True),
        "progressive JPEG",
        (40, 50),
        (0, 128, 255),
        4,
    )
    good(
        "lab.tif",
        encode(solid("LAB", (20, 20), (255, 128, 128)), "TIFF"),
        "CIELab TIFF, L*=100 a*=b*=0 -> white",
        (20, 20),
        white,
        3,
    )

    # EXIF orientation 6: stored 40 wide x 20 high with a red top-left corner; a viewer rotates it
    # 90 degrees clockwise, so the result is 20 wide x 40 high with the red corner at top-right.
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = with_corner(solid("RGB", (40, 20), (128, 128, 128)), red)
    good(
        "exif_orientation6.jpg",
        encode(stored, "JPEG", quality=95, exif=exif.tobytes()),
        "JPEG with EXIF orientation 6: 40x20 stored, 20x40 shown, red corner moves top-right",
        (40, 20),
        (128, 128, 128),
        8,
    )

    # Corrupt EXIF (an IFD offset pointing past the end): the pixels are fine, so it must load.
    plain = encode(solid("RGB", (32, 32), (0, 200, 0)), "JPEG", quality=95)
    app1 = b"Exif\0\0" + b"II*\0" + struct.pack("<I", 0x7FFFFF00) + b"\0" * 8
    good(
        "corrupt_exif.jpg",
        plain[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + plain[2:],
        "JPEG whose EXIF block is garbage: orientation ignored, image loads",
        (32, 32),
        (0, 200, 0),
        4,
    )

    frames = [solid("RGB", (30, 20), c) for c in (red, (0, 255, 0), (0, 0, 255))]
    good(
        "animated.gif",
        encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
        "animated GIF, 3 frames: first frame (red) is used",
        (20, 30),
        red,
    )
    good(
        "animated.png",
        encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100, loop=0),
        "animated PNG (APNG), 3 frames: first frame (red) is used",
        (20, 30),
        red,
    )
    pages = [solid("RGB", (64, 48), red), solid("RGB", (32, 32), (0, 255, 0))]
    good(
        "multipage.tif",
        encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]),
        "multi-page TIFF with pages of different sizes: first page used",
        (48, 64),
        red,
    )
    good("plain.bmp", encode(solid("RGB", (24, 20), (1, 2, 3)), "BMP"), "BMP", (20, 24), (1, 2, 3))
    good("plain.ppm", encode(solid("RGB", (24, 20), (4, 5, 6)), "PPM"), "binary PPM", (20, 24), (4, 5, 6))
    if features.check("webp"):
        good(
            "lossless.webp",
            encode(solid("RGBA", (24, 20), (0, 0, 0, 0)), "WEBP", lossless=True),
            "lossless WebP with alpha, transparent -> white",
            (20, 24),
            white,
        )

    # Naming tricks: the loader must not care, and must print the names readably.
    rgb_bytes = rgb_png.read_bytes()
    good("name with spaces.png", rgb_bytes, "file name with spaces", (48, 64), red)
    good("ünïcødé 画像.png", rgb_bytes, "non-ASCII (unicode) file name", (48, 64), red)
    good("-rf.png", rgb_bytes, "file name starting with '-' (would be an option to a CLI)", (48, 64), red)
    good("png_named.jpg", rgb_bytes, "PNG content with a .jpg extension: content decides", (48, 64), red)
    link = _fresh(folder / "link_to_rgb.png")
    link.symlink_to("rgb.png")
    cases.append(HostileCase(link, True, "relative symlink to a good file", (48, 64), red))
    good(
        "wide_32to1.png",
        encode(solid("RGB", (512, 16), (9, 9, 9)), "PNG"),
        "extreme but allowed aspect: 512x16 is exactly 32:1",
        (16, 512),
        (9, 9, 9),
    )
    good(
        "tall_min_side.png",
        encode(solid("RGB", (16, 100), (7, 7, 7)), "PNG"),
        "narrowest allowed side: 16 px",
        (100, 16),
        (7, 7, 7),
    )

    unreadable = _fresh(folder / "unreadable.png")
    unreadable.write_bytes(rgb_bytes)
    unreadable.chmod(0)
    if _can_read(unreadable):
        # Root (more precisely: CAP_DAC_OVERRIDE, which root usually holds) reads files whatever
        # their mode bits, so there the honest expectation is that it loads. Asking the OS rather
        # than testing euid == 0 also gets capability-less root and odd filesystems right. The
        # refusal itself is covered by a test that fakes PermissionError.
        cases.append(
            HostileCase(
                unreadable, True, "chmod 000 file: this process can read it anyway (root)", (48, 64), red
            )
        )
    else:
        cases.append(
            HostileCase(unreadable, False, "chmod 000 file (no read permission)", reason="permission denied")
        )

    # ---------------- bad files ----------------
    bad("empty.jpg", b"", "zero bytes", "empty file")
    bad(
        "text.jpg",
        b"Hello, this is not a JPEG.\nJust some text.\n",
        "plain text with a .jpg extension",
        "text",
    )
    bad(
        "page.png",
        b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body></body></html>\n",
        "HTML (e.g. an error page saved by a downloader) with a .png extension",
        "HTML",
    )
    bad(
        "postscript.jpg",
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n",
        "EPS with .jpg extension: must never reach Pillow's Ghostscript-based EPS decoder",
        "PostScript",
    )
    bad(
        "random.png",
        np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "4 KiB of random bytes",
        "not a recognised image",
    )

    noisy_png = encode(noise_rgb(64, 64, seed=2), "PNG")
    bad(
        "truncated.png",
        noisy_png[: len(noisy_png) * 6 // 10],
        "PNG cut at 60% (interrupted download)",
        "truncated or corrupt",
    )
    noisy_jpg = encode(noise_rgb(64, 64, seed=3), "JPEG", quality=90)
    bad(
        "truncated.jpg",
        noisy_jpg[: len(noisy_jpg) * 6 // 10],
        "JPEG cut at 60% (interrupted download)",
        "truncated or corrupt",
    )
    noisy_tif = encode(noise_rgb(64, 64, seed=4), "TIFF")  # Pillow puts the IFD first, pixels after
    bad(
        "truncated.tif",
        noisy_tif[: len(noisy_tif) * 6 // 10],
        "uncompressed TIFF cut at 60%: header intact, strip data missing",
        "truncated or corrupt",
    )
    bad(
        "header_only.png",
        noisy_png[:33],
        "PNG signature and IHDR only, no pixel data",
        "truncated or corrupt PNG header",
    )

    # Damage the deflate stream in the middle of the IDAT data and recompute the CRC, so the only
    # defect is in the compressed pixels (Pillow does not check IDAT CRCs, zlib must notice).
    damaged = bytearray(noisy_png)
    offset, _ctype, length = next(c for c in iter_png_chunks(noisy_png) if c[1] == b"IDAT")
    start = offset + 8 + length // 2
    damaged[start : start + 64] = b"\xff" * 64
    damaged[offset + 8 + length : offset + 12 + length] = struct.pack(
        ">I", zlib.crc32(bytes(damaged[offset + 4 : offset + 8 + length])) & 0xFFFFFFFF
    )
    bad(
        "corrupt_idat.png",
        bytes(damaged),
        "0xFF bytes in the middle of the IDAT deflate stream (CRC fixed)",
        "truncated or corrupt",
    )

    tiny_idat = zlib.compress(b"\0" * 16)
    bad(
        "bomb_100000x100000.png",
        raw_png(100_000, 100_000, bit_depth=8, color_type=2, idat=tiny_idat),
        "decompression bomb: 100 KB-class file declaring 100000x100000 (10 gigapixels)",
        "too large",
    )
    bad(
        "bomb_9000x9000.png",
        raw_png(9000, 9000, bit_depth=8, color_type=2, idat=tiny_idat),
        "81 MP header: above our 67 MP limit but below Pillow's own bomb threshold",
        "too large",
    )
    small_jpg = bytearray(encode(solid("RGB", (32, 32), red), "JPEG"))
    sof = small_jpg.index(b"\xff\xc0")
    small_jpg[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    bad("bomb_60000x60000.jpg", bytes(small_jpg), "JPEG whose SOF0 header claims 60000x60000", "too large")
    small_gif = bytearray(encode(solid("P", (32, 32), 0), "GIF"))
    small_gif[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen size
    bad(
        "bomb_65535x65535.gif",
        bytes(small_gif),
        "GIF whose screen descriptor claims 65535x65535",
        "too large",
    )
    ztxt_bomb = png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"\0" * (16 * 1024 * 1024), 9))
    bad(
        "ztxt_bomb.png",
        raw_png(32, 32, bit_depth=8, color_type=0, idat=zlib.compress(b"\0" * 33 * 32), extra=ztxt_bomb),
        "valid PNG with a zTXt chunk inflating to 16 MiB (metadata bomb)",
        "corrupt",
    )

    bad(
        "tiny_4x4.png",
        encode(solid("RGB", (4, 4), red), "PNG"),
        "4x4 image: too small to dream on",
        "too small",
    )
    bad(
        "zero_width.png",
        raw_png(0, 32, bit_depth=8, color_type=2, idat=tiny_idat),
        "IHDR declaring width 0",
        "corrupt",
    )
    bad(
        "strip_33to1.png",
        encode(solid("RGB", (528, 16), red), "PNG"),
        "528x16: aspect 33:1 beyond the limit",
        "aspect",
    )
    bad(
        "bad\nname\x1b[31m.png",
        b"not an image\n",
        "text file whose name holds a newline and an ANSI escape",
        "text",
    )

    directory = _fresh(folder / "x.png")
    directory.mkdir()
    cases.append(HostileCase(directory, False, "a directory named x.png", reason="directory"))
    dangling = _fresh(folder / "dangling.png")
    dangling.symlink_to("does-not-exist.png")
    cases.append(HostileCase(dangling, False, "symlink whose target does not exist", reason="dangling"))
    cases.append(
        HostileCase(folder / "missing.png", False, "path that does not exist", reason="no such file")
    )
    if hasattr(os, "mkfifo"):
        fifo = _fresh(folder / "pipe.png")
        os.mkfifo(fifo)
        cases.append(
            HostileCase(
                fifo, False, "named pipe called pipe.png: must not block", reason="not a regular file"
            )
        )
    return cases


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUTDIR", file=sys.stderr)
        return 2
    for case in make_corpus(Path(argv[1])):
        verdict = "LOAD  " if case.should_load else "REFUSE"
        print(f"{verdict} {case.path.name!a:40} {case.description}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
