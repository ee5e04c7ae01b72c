"""Contact sheets and the HTML gallery: layout, placeholders, escaping and relative links."""

from __future__ import annotations

import itertools
import re
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxdream.gallery import GalleryEntry, Tile, contact_sheet, write_gallery
from jaxdream.images import read_recipe

CELL = 48


def _solid(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _colour(i: int) -> tuple[int, int, int]:
    """Distinct saturated colours that no label or background pixel can take."""
    return (255 - 9 * i, (37 * i) % 256, 250 if i % 2 else 5)


def _tiles(tmp_path: Path, grid: list[tuple[str, list[object]]]) -> list[Tile]:
    names = [name for name, _ in grid]
    combos = list(itertools.product(*(values for _, values in grid)))
    return [Tile(_solid(tmp_path / f"t{i}.png", _colour(i)), dict(zip(names, combo)))
            for i, combo in enumerate(combos)]


def _centres(sheet: np.ndarray, n: int) -> list[tuple[float, float]]:
    """(row, col) centre of each tile colour on the sheet; asserts each fills a full cell."""
    centres = []
    for i in range(n):
        ys, xs = np.nonzero(np.all(sheet == np.array(_colour(i), dtype=np.uint8), axis=-1))
        assert ys.size == CELL * CELL, f"tile {i} should fill one {CELL}x{CELL} cell"
        centres.append((float(ys.mean()), float(xs.mean())))
    return centres


@pytest.mark.parametrize(
    ("grid", "rows", "cols"),
    [
        ([("step_size", [0.5, 1.0, 2.0])], 1, 3),
        ([("step_size", [0.5, 1.0]), ("layers", ["block8", "block10", "block8:1.0,block10:2.0"])], 2, 3),
        ([("octaves", [3, 4]), ("jitter", [0, 32]), ("seed", [0, 1, 2])], 4, 3),
    ],
)
def test_sheet_layout_puts_each_tile_in_its_cell(tmp_path: Path, grid: list[tuple[str, list[object]]],
                                                 rows: int, cols: int) -> None:
    tiles = _tiles(tmp_path, grid)
    out = contact_sheet(tiles, grid, tmp_path / "sheet.png", title="t", cell=CELL)
    sheet = _pixels(out)
    centres = _centres(sheet, len(tiles))
    ys = sorted({round(y) for y, _ in centres})
    xs = sorted({round(x) for _, x in centres})
    assert (len(ys), len(xs)) == (rows, cols)
    for i, (y, x) in enumerate(centres):  # row-major: tile i sits at row i // cols, column i % cols
        assert (ys.index(round(y)), xs.index(round(x))) == divmod(i, cols)
    assert sheet.shape[1] >= cols * CELL and sheet.shape[0] >= rows * CELL
    recipe = read_recipe(out)
    assert recipe["kind"] == "contact_sheet" and [a[0] for a in recipe["axes"]] == [n for n, _ in grid]


def test_sheet_grows_with_rows_and_columns(tmp_path: Path) -> None:
    small = [("a", [1, 2]), ("b", [1, 2])]
    wide = [("a", [1, 2]), ("b", [1, 2, 3, 4])]
    tall = [("a", [1, 2, 3, 4]), ("b", [1, 2])]
    sizes = {}
    for name, grid in (("small", small), ("wide", wide), ("tall", tall)):
        (tmp_path / name).mkdir()
        out = contact_sheet(_tiles(tmp_path / name, grid), grid, tmp_path / f"{name}.png", cell=CELL)
        sizes[name] = _size(out)
    assert sizes["wide"][0] >= sizes["small"][0] + 2 * CELL and sizes["wide"][1] == sizes["small"][1]
    assert sizes["tall"][1] >= sizes["small"][1] + 2 * CELL and sizes["tall"][0] == sizes["small"][0]


def test_sheet_keeps_aspect_and_draws_placeholders(tmp_path: Path) -> None:
    grid = [("x", [1, 2, 3])]
    wide = _solid(tmp_path / "wide.png", (255, 0, 0), (64, 32))
    tiles = [Tile(wide, {"x": 1}), Tile(tmp_path / "gone.png", {"x": 2}),
             Tile(tmp_path / "failed.png", {"x": 3}, status="failed")]
    sheet = _pixels(contact_sheet(tiles, grid, tmp_path / "s.png", cell=CELL))
    ys, xs = np.nonzero(np.all(sheet == (255, 0, 0), axis=-1))
    assert (np.ptp(xs) + 1, np.ptp(ys) + 1) == (CELL, CELL // 2)  # fitted, aspect kept
    grey = np.all(sheet == (78, 78, 78), axis=-1)  # the placeholder fill
    # Cells take the images' landscape shape, placeholders included: no empty bands.
    filled = np.nonzero(grey.sum(axis=1) > CELL)[0]  # rows across both placeholder cells
    assert np.ptp(filled) + 1 == CELL // 2
    assert grey.sum() > 2 * CELL * (CELL // 2) * 0.6  # two cells of it, less their words
    assert sheet.shape[0] < sheet.shape[1] / 2


def test_sheet_wraps_long_labels_and_rejects_bad_counts(tmp_path: Path) -> None:
    long = ",".join(f"block{i}:{i}.0" for i in range(12))
    grid = [("layers", [long, "block1"]), ("step", [1])]
    out = contact_sheet(_tiles(tmp_path, grid), grid, tmp_path / "s.png", title="T" * 500, cell=CELL)
    width = _size(out)[0]
    assert width < 4 * CELL  # the long label wrapped instead of widening the sheet
    with pytest.raises(ValueError, match="tiles"):
        contact_sheet(_tiles(tmp_path, grid)[:1] * 3, grid, tmp_path / "bad.png")


def _links(page: str) -> list[str]:
    return re.findall(r'(?:href|src)="([^"]*)"', page)


def test_gallery_links_escaping_and_failures(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    hostile = ["<script>alert(1)</script>.png", 'a"b.png', "c d:e&f.png", "x.png"]
    entries = [GalleryEntry(_solid(out / "x_sheet.png", (1, 2, 3), (96, 64)), "x.jpg", {"grid": "a x b"},
                            "done", kind="sheet")]
    for i, name in enumerate(hostile):
        # "/" cannot be in a file name: the script name lands in a sub-folder, which is fine
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        entries.append(GalleryEntry(_solid(path, _colour(i), (400, 200)), "<script>alert(2)</script>.jpg",
                                    {"layers": "<b>block10</b>", "step": 1.5}, "done"))
    entries.append(GalleryEntry(out / "lost.png", 'evil"<img src=x>.jpg', {"s": 1}, "failed",
                                "cannot decode <input>"))
    entries.append(GalleryEntry(tmp_path / "elsewhere.png", "y.jpg", {}, "done"))  # outside outdir
    index = write_gallery(out, entries, title="<title>")
    page = index.read_text(encoding="utf-8")

    assert "<script" not in page and "<b>" not in page and "<img src=x>" not in page
    assert "&lt;script&gt;alert(2)&lt;/script&gt;.jpg" in page and "a&quot;b.png" in page
    assert "cannot decode &lt;input&gt;" in page and "Not rendered" in page
    assert str(tmp_path) not in page and "file:" not in page
    links = _links(page)
    assert links and all(not link.startswith("/") and ".." not in link and ":" not in link for link in links)
    targets = {urllib.parse.unquote(link) for link in links}
    for entry in entries[:-2]:  # every rendered output is linked, and its thumbnail exists
        assert str(entry.output.relative_to(out)) in targets
    for link in links:
        assert (out / urllib.parse.unquote(link)).is_file(), link
    thumbs = [t for t in targets if t.startswith("thumbs/")]
    assert len(thumbs) == 5
    for t in thumbs:  # single outputs get small thumbnails; sheets larger, readable ones
        assert max(_size(out / t)) == (96 if t.startswith("thumbs/x_sheet") else 320)
    assert page.index('href="x_sheet.png"') < page.index('href="x.png"')  # sheets first
    assert 'loading="lazy"' in page and "elsewhere.png" in page
    assert not list(out.glob(".*.tmp")) and not list((out / "thumbs").glob(".*.tmp"))
    # a second run reuses the thumbnails and writes the same page
    assert write_gallery(out, entries, title="<title>").read_text(encoding="utf-8") == page


def test_a_big_job_gets_a_summary_page_not_a_page_of_every_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above GALLERY_LIMIT outputs the page shows the first outputs and failures, the counts
    of all, and links the manifest; the thumbnails of the others are never made."""
    from PIL import Image as PILImage

    from jaxdream import gallery
    from jaxdream.config import load_config
    from jaxdream.recipe import Recipe
    from jaxdream.render import Outcome, WorkItem

    monkeypatch.setattr(gallery, "GALLERY_LIMIT", 10)
    monkeypatch.setattr(gallery, "SUMMARY_OUTPUTS", 3)
    outdir = tmp_path / "out"
    outdir.mkdir()
    config_path = tmp_path / "job.yaml"
    config_path.write_text(f"inputs: {tmp_path}\noutput: {outdir}\n", encoding="utf-8")
    config = load_config(config_path)
    recipe = Recipe(layers=(("block0", 1.0),), steps=1, octaves=1)
    items, outcomes = [], []
    for index in range(30):
        output = outdir / f"p{index:02d}_dream.png"
        items.append(WorkItem(id=f"id{index}", input=f"in/p{index:02d}.png", output=output,
                              recipe=recipe))
        if index % 10 == 9:
            outcomes.append(Outcome(f"in/p{index:02d}.png", None, "failed", "bad", f"id{index}"))
        else:
            PILImage.new("RGB", (64, 48)).save(output)
            outcomes.append(Outcome(f"in/p{index:02d}.png", output, "done", "", f"id{index}"))
    page_path = gallery.sheets_and_gallery(config, items, outcomes, report=lambda line: None)
    assert page_path == outdir / "index.html"
    page = page_path.read_text(encoding="utf-8")
    assert "30 outputs: 27 done, 3 failed" in page and 'href="manifest.jsonl"' in page
    assert page.count("<figure") == 3 and page.count('class="reason"') == 3
    assert len(list((outdir / "thumbs").iterdir())) == 3
