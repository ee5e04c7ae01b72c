"""Contact sheets and a static HTML gallery for a folder of renders.

A parameter grid produces many outputs that only make sense side by side, so
:func:`contact_sheet` lays tiles out as a labelled grid in one PNG and :func:`write_gallery`
writes an ``index.html`` that opens straight from disk. Names and parameters come from users
and file systems, so every string put into HTML is escaped and every link is a percent-encoded
path *inside* the output folder. :func:`sheets_and_gallery` writes both for a finished job.
Like :mod:`jaxdream.images`, this module imports no JAX.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import io
import itertools
import math
import os
import re
import sys
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jaxdream.errors import JaxdreamError
from jaxdream.files import atomic_write, display
from jaxdream.images import load_rgb, save_png

if TYPE_CHECKING:
    from jaxdream.config import JobConfig
    from jaxdream.render import Outcome, WorkItem

__all__ = ["GalleryEntry", "Tile", "contact_sheet", "write_gallery"]

#: Largest side of a contact sheet; bigger grids get smaller cells rather than a PNG that
#: viewers refuse (and gigabytes of RAM while drawing it).
MAX_SHEET_SIDE = 16384
THUMB_SIDE = 320  # gallery thumbnails of single outputs
SHEET_THUMB_SIDE = 1280  # sheets hold many labelled cells; at 320 px their text is unreadable

_BG, _FG, _PLACEHOLDER, _PLACEHOLDER_FG = (34, 34, 34), (235, 235, 235), (78, 78, 78), (200, 200, 200)
_FONT_CACHE: dict[int, Any] = {}
_BREAK = re.compile(r"[^\s,;=]+[\s,;=]*|[\s,;=]+")  # tokens end after a space, comma, ; or =


@dataclasses.dataclass(frozen=True)
class Tile:
    """One cell of a contact sheet: a rendered PNG (possibly missing) and its grid point."""

    image: Path
    params: Mapping[str, Any]
    status: str = "done"  # "failed" labels the placeholder of a missing image "failed"


@dataclasses.dataclass(frozen=True)
class GalleryEntry:
    """One output for :func:`write_gallery`; ``kind`` is ``"image"`` or ``"sheet"``."""

    output: Path
    input: str
    params: Mapping[str, Any]
    status: str  # "done", "failed" or "skipped"
    reason: str = ""
    kind: str = "image"


def _text(value: Any) -> str:
    """A value as short display text: floats as %g, control characters and surrogates escaped."""
    return display(format(value, "g") if isinstance(value, float) else str(value))


def _font(size: int) -> Any:
    # Pillow's bundled font scales only when built with FreeType; otherwise the fixed bitmap
    # font is returned, which still works with the same calls.
    if size not in _FONT_CACHE:
        _FONT_CACHE[size] = ImageFont.load_default(size=size)
    return _FONT_CACHE[size]


def _wrap(text: str, font: Any, width: int, max_lines: int) -> list[str]:
    """Break ``text`` into lines no wider than ``width`` px, preferring breaks after , ; = or
    spaces; overlong tokens are cut by character. Lines beyond ``max_lines`` become '...'."""
    fits = lambda s: font.getlength(s) <= width  # noqa: E731
    lines: list[str] = []
    for para in text[:4000].split("\n"):  # bound the work on absurd labels; 4000 chars never fit
        line = ""
        for token in _BREAK.findall(para):
            if fits(line + token):
                line += token
                continue
            if line.strip():
                lines.append(line.rstrip())
            token = token.lstrip()
            while token and not fits(token):  # binary search for the longest prefix that fits
                lo, hi = 1, len(token)
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    lo, hi = (mid, hi) if fits(token[:mid]) else (lo, mid - 1)
                lines.append(token[:lo])
                token = token[lo:]
            line = token
        if line.strip() or not para:
            lines.append(line.rstrip())
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and not fits(last + "..."):
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "..."]
    return lines


def _draw_lines(draw: ImageDraw.ImageDraw, lines: list[str], box: tuple[int, int, int, int],
                font: Any, line_h: int, fill: tuple[int, int, int], align: str) -> None:
    """Draw ``lines`` vertically centred in ``box`` (x0, y0, x1, y1), aligned left or centre."""
    x0, y0, x1, y1 = box
    y = y0 + max(0, (y1 - y0 - line_h * len(lines)) // 2)
    for line in lines:
        x = x0 if align == "left" else x0 + (x1 - x0 - int(font.getlength(line))) // 2
        draw.text((x, y), line, font=font, fill=fill)
        y += line_h


def _fit(image: Path, cell: int) -> Image.Image | None:
    """The image scaled (Lanczos, aspect kept) so its longer side is ``cell``; None if unreadable."""
    try:
        rgb = Image.fromarray(load_rgb(image, max_side=cell))  # the safe loader: no bombs
    except JaxdreamError:
        return None
    w, h = rgb.size
    if max(w, h) < cell:  # load_rgb never upscales; small tiles should still fill their cell
        scale = cell / max(w, h)
        rgb = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    return rgb


def contact_sheet(tiles: Sequence[Tile], grid: Sequence[tuple[str, Sequence[Any]]], path: Path, *,
                  title: str = "", cell: int = 256) -> Path:
    """Draw ``tiles`` (the row-major cartesian product of ``grid``'s axes) as one labelled PNG.

    The first axis labels the rows and the last the columns; axes in between are folded into
    the row labels. With one axis the tiles form a single row. Missing or unreadable images
    become grey "missing"/"failed" cells. The PNG is written atomically with a small recipe
    describing the sheet. Raises ValueError on a tile count that does not match ``grid``.
    """
    axes = [(_text(name), list(values)) for name, values in grid]
    if len(tiles) != math.prod(len(v) for _, v in axes):
        raise ValueError(f"{len(tiles)} tiles for a grid of {[len(v) for _, v in axes]} values")
    if not tiles or cell < 16:
        raise ValueError("contact_sheet needs at least one tile and cell >= 16")
    label = lambda name, value: f"{name}={_text(value)}"  # noqa: E731
    cols = [label(axes[-1][0], v) for v in axes[-1][1]] if axes else [""]
    rows = ["\n".join(label(n, v) for (n, _), v in zip(axes[:-1], combo))
            for combo in itertools.product(*(v for _, v in axes[:-1]))] if len(axes) > 1 else []
    n_rows, n_cols = max(1, len(rows)), len(cols)
    cell = min(cell, MAX_SHEET_SIDE // (max(n_rows, n_cols) + 1))
    if cell < 16:
        raise JaxdreamError(f"contact sheet of {n_rows}x{n_cols} cells does not fit {MAX_SHEET_SIDE} px")

    # Cells take the shape of the images (landscape photos get landscape cells, no bands of
    # empty background), fitted within cell x cell.
    thumbs = [_fit(tile.image, cell) for tile in tiles]
    cell_w = max([t.width for t in thumbs if t is not None], default=cell)
    cell_h = max([t.height for t in thumbs if t is not None], default=cell)
    # Text scales with the cell so a sheet shown at any size stays proportioned.
    font, title_font = _font(max(13, cell // 15)), _font(max(16, cell // 10))
    line_h = font.getbbox("Ag|")[3] + max(2, cell // 64)
    title_line_h = title_font.getbbox("Ag|")[3] + max(2, cell // 48)
    gap, margin = max(4, cell // 32), max(8, cell // 16)
    label_w = 0
    if rows:  # as wide as the widest "name=value" part, between half a cell and a full one
        parts = [p for r in rows for p in r.split("\n")]
        label_w = min(cell, max(cell // 2, max(int(font.getlength(p)) for p in parts) + gap))
    row_lines = [_wrap(r, font, label_w - gap, max(1, cell_h // line_h)) for r in rows]
    col_lines = [_wrap(c, font, cell_w - gap, 4) for c in cols]
    header_h = max(len(c) for c in col_lines) * line_h + gap if any(cols) else 0
    grid_w = n_cols * cell_w + (n_cols - 1) * gap
    width = 2 * margin + label_w + grid_w
    title_lines = _wrap(_text(title), title_font, width - 2 * margin, 3) if title else []
    title_h = len(title_lines) * title_line_h + (gap if title else 0)
    height = 2 * margin + title_h + header_h + n_rows * cell_h + (n_rows - 1) * gap

    sheet = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(sheet)
    _draw_lines(draw, title_lines, (margin, margin, margin + grid_w + label_w, margin + title_h - gap),
                title_font, title_line_h, _FG, "left")
    top, left = margin + title_h + header_h, margin + label_w
    for c, lines in enumerate(col_lines):
        x = left + c * (cell_w + gap)
        y0 = top - gap - len(lines) * line_h  # bottom-aligned: each label sits on its column
        _draw_lines(draw, lines, (x, y0, x + cell_w, top - gap), font, line_h, _FG, "centre")
    for r, lines in enumerate(row_lines):
        y = top + r * (cell_h + gap)
        _draw_lines(draw, lines, (margin, y, margin + label_w - gap, y + cell_h), font, line_h, _FG,
                    "left")
    for i, (tile, thumb) in enumerate(zip(tiles, thumbs, strict=True)):
        x, y = left + (i % n_cols) * (cell_w + gap), top + (i // n_cols) * (cell_h + gap)
        if thumb is None:
            draw.rectangle((x, y, x + cell_w - 1, y + cell_h - 1), fill=_PLACEHOLDER)
            word = "unreadable" if Path(tile.image).exists() else "missing"
            word = "failed" if tile.status == "failed" else word
            _draw_lines(draw, [word], (x, y, x + cell_w, y + cell_h), font, line_h, _PLACEHOLDER_FG,
                        "centre")
        else:
            sheet.paste(thumb, (x + (cell_w - thumb.width) // 2, y + (cell_h - thumb.height) // 2))
    recipe = {"kind": "contact_sheet", "title": _text(title), "cell": cell,
              "axes": [[name, [_text(v) for v in values]] for name, values in axes],
              "tiles": [_text(Path(t.image).name) for t in tiles]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(path, np.asarray(sheet), recipe)
    return path


# --------------------------------------------------------------------------------------------
# HTML gallery


def _url(rel: str) -> str:
    """A relative path as a URL: every component percent-encoded (':' too, so no scheme)."""
    return "/".join(urllib.parse.quote(os.fsencode(part), safe="") for part in rel.split(os.sep))


def _thumbnail(src: Path, dest: Path, side: int) -> tuple[int, int] | None:
    """Make (or reuse, when newer than ``src``) a JPEG thumbnail; its size, or None if unreadable."""
    try:  # reruns over a big folder would otherwise re-decode every full-size output
        if dest.stat().st_mtime_ns >= src.stat().st_mtime_ns:
            with Image.open(dest) as done:
                return done.size
    except OSError:  # no thumbnail yet, or a broken one: make it again
        pass
    try:
        thumb = Image.fromarray(load_rgb(src, max_side=side))
        buf = io.BytesIO()
        thumb.save(buf, format="JPEG", quality=85)
        atomic_write(dest, lambda out: out.write(buf.getvalue()))
        return thumb.size
    except (JaxdreamError, OSError):
        return None


def _params_table(params: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in params.items())
    return f'<table class="params">{rows}</table>' if rows else ""


def _esc(value: Any) -> str:
    return html.escape(_text(value), quote=True)


_CSS = """body{background:#222;color:#ddd;font:14px/1.4 system-ui,sans-serif;margin:1.5em}
a{color:#9cf}h2{border-bottom:1px solid #444;padding-bottom:.2em}h3{margin:1.2em 0 .4em}
.grid{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
figure{margin:0;background:#2c2c2c;padding:8px;border-radius:4px;max-width:320px}
figure.sheet{max-width:none}figure.sheet img{max-width:100%;height:auto}
img{display:block;background:#333}.name{font-weight:600;overflow-wrap:anywhere;margin:.3em 0}
.params{border-collapse:collapse;font-size:12px}.params th{text-align:left;color:#999;
font-weight:normal;padding-right:.8em;vertical-align:top}.params td{overflow-wrap:anywhere}
.noimg{width:200px;height:120px;display:flex;align-items:center;justify-content:center;
background:#444;color:#bbb}.badge{color:#fc6;font-size:12px}.reason{color:#f88}
li{margin-bottom:.6em}"""


def write_gallery(outdir: Path, entries: Sequence[GalleryEntry], *, title: str = "jaxdream",
                  summary: str | None = None) -> Path:
    """Write ``outdir/index.html`` (plus ``outdir/thumbs/``) showing ``entries``; returns its path.

    Sheets come first, then outputs grouped by input in the order given, then everything that
    was not rendered (failed, or no output file) with its reason. ``summary`` (HTML) replaces the
    line of counts, for a page that shows a part of a big job. ``output`` paths are taken as
    given (absolute, or relative to the working directory); one outside ``outdir`` is listed
    without a link, so the page never points outside its own folder. Thumbnails are JPEGs named
    after the output plus a hash of its path, reused while newer than the output. Raises
    JaxdreamError if the page cannot be written.
    """
    outdir = Path(outdir)
    root = os.path.abspath(outdir)
    thumbs = outdir / "thumbs"
    sections: dict[str, dict[str, list[str]]] = {"sheet": {}, "image": {}}
    problems: list[str] = []
    try:
        thumbs.mkdir(parents=True, exist_ok=True)
        for e in entries:
            full = os.path.abspath(e.output)
            inside = os.path.commonpath([root, full]) == root and full != root
            rel = os.path.relpath(full, root) if inside else None
            name = _esc(Path(e.output).name)
            if e.status == "failed" or rel is None or not os.path.isfile(full):
                why = e.reason or ("output outside the gallery folder" if rel is None else "no output file")
                problems.append(f'<li><span class="name">{name}</span> from {_esc(e.input)} '
                                f'({_esc(e.status)}): <span class="reason">{_esc(why)}</span>'
                                f'{_params_table(e.params)}</li>')
                continue
            digest = hashlib.sha256(os.fsencode(rel)).hexdigest()[:12]
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(rel).stem)[:60].strip("._-") or "output"
            thumb_name = f"{stem}-{digest}.jpg"
            side = SHEET_THUMB_SIDE if e.kind == "sheet" else THUMB_SIDE
            size = _thumbnail(Path(full), thumbs / thumb_name, side)
            img = (f'<img src="{_url(os.path.join("thumbs", thumb_name))}" loading="lazy" '
                   f'width="{size[0]}" height="{size[1]}" alt="{name}">' if size
                   else '<div class="noimg">no preview</div>')
            badge = (f' <span class="badge">{_esc(e.status)} {_esc(e.reason)}</span>'
                     if e.status != "done" else "")
            kind = "sheet" if e.kind == "sheet" else "image"
            sections[kind].setdefault(e.input, []).append(
                f'<figure class="{kind}"><a href="{_url(rel)}">{img}</a><figcaption>'
                f'<div class="name">{name}{badge}</div>{_params_table(e.params)}</figcaption></figure>')
        body = [f"<h1>{_esc(title)}</h1>"]
        outputs = [e for e in entries if e.kind != "sheet"]
        counts = {s: sum(e.status == s for e in outputs) for s in ("done", "skipped", "failed")}
        body.append(summary if summary is not None else
                    "<p>" + ", ".join(f"{n} {s}" for s, n in counts.items()) + "</p>")
        for kind, heading in (("sheet", "Contact sheets"), ("image", "Outputs")):
            if sections[kind]:
                body.append(f"<h2>{heading}</h2>")
                for source, figures in sections[kind].items():
                    body.append(f'<h3>{_esc(source)}</h3><div class="grid">{"".join(figures)}</div>')
        if problems:
            body.append(f'<h2>Not rendered</h2><ul>{"".join(problems)}</ul>')
        page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width,initial-scale=1">'
                f"<title>{_esc(title)}</title><style>{_CSS}</style></head>\n<body>\n"
                + "\n".join(body) + "\n</body></html>\n")
        index = outdir / "index.html"
        atomic_write(index, lambda out: out.write(page.encode("utf-8")))
    except OSError as exc:
        where = exc.filename if isinstance(exc.filename, str) else outdir
        why = exc.strerror or str(exc)
        if isinstance(exc, FileExistsError) and os.path.abspath(where) == os.path.abspath(thumbs):
            why = "it exists and is not a folder"  # mkdir's EEXIST on a file or FIFO in the way
        raise JaxdreamError(f"{_text(where)}: cannot write the gallery ({why})") from exc
    return index


# --------------------------------------------------------------------------------------------
# A job's sheets and gallery


#: Above this many outputs the gallery is a summary: a page of 100,000 thumbnails helps no
#: one (and would make the driver read every output), and the manifest lists every output.
GALLERY_LIMIT = 2000
#: A summary page shows the first outputs and the first failures, no more.
SUMMARY_OUTPUTS = 200
SUMMARY_FAILURES = 1000


def _summary(items: Sequence[WorkItem], by_id: Mapping[str, Outcome]
             ) -> tuple[str, list[WorkItem]]:
    """The counts line of a big job's page, and the items it shows: the first
    :data:`SUMMARY_OUTPUTS` done ones and the first :data:`SUMMARY_FAILURES` failed ones."""
    counts: dict[str, int] = {}
    done: list[WorkItem] = []
    failed: list[WorkItem] = []
    for item in items:
        outcome = by_id.get(item.id)
        status = outcome.status if outcome else "missing"
        counts[status] = counts.get(status, 0) + 1
        if status == "done" and len(done) < SUMMARY_OUTPUTS:
            done.append(item)
        elif status != "done" and len(failed) < SUMMARY_FAILURES:
            failed.append(item)
    text = (f"<p>{len(items)} outputs: " + ", ".join(f"{n} {s}" for s, n in counts.items())
            + f". This page shows the first {len(done)} outputs and the first {len(failed)} "
            f'that were not rendered; <a href="manifest.jsonl">manifest.jsonl</a> lists every '
            f"one.</p>")
    return text, done + failed


def sheets_and_gallery(config: JobConfig, items: Sequence[WorkItem],
                       outcomes: Sequence[Outcome], *,
                       report: Callable[[str], None] | None = None) -> Path | None:
    """Writes a contact sheet per input (when the job has a grid) and ``OUTDIR/index.html``.

    Returns the gallery's path (None if it cannot be written); a job of more than
    :data:`GALLERY_LIMIT` outputs gets a summary page (:func:`_summary`). A sheet that cannot be
    written is reported (an ``error:`` line, which callers count into the exit status) and does
    not stop the others: the dreams themselves are already safe on disk. Inputs that failed
    before they became items (missing, a device, empty) are listed too, so the gallery, the
    summary and the manifest agree.
    """
    say = report or (lambda line: print(line, file=sys.stderr))
    by_id = {outcome.id: outcome for outcome in outcomes if outcome.id}
    entries: list[GalleryEntry] = []
    if config.grid:
        per_input: dict[str, list[WorkItem]] = {}
        for item in items:
            per_input.setdefault(item.input, []).append(item)
        for path, group in per_input.items():
            if len(group) != len(config.variants):
                continue
            tiles = [Tile(item.output, item.point, by_id[item.id].status if item.id in by_id
                          else "missing") for item in group]
            stem = group[0].output.name.rsplit("_dream", 1)[0]
            sheet = group[0].output.parent / f"{stem}_grid.png"
            try:
                contact_sheet(tiles, config.grid, sheet,
                              title=f"{Path(path).name}: {group[0].recipe.model}")
            except (JaxdreamError, OSError) as error:
                say(f"error: contact sheet {sheet}: {error}")
                continue
            entries.append(GalleryEntry(sheet, Path(path).name, {"grid": " x ".join(
                name for name, _ in config.grid)}, "done", kind="sheet"))
    summary = None
    shown: Sequence[WorkItem] = items
    if len(items) > GALLERY_LIMIT:
        summary, shown = _summary(items, by_id)
    for item in shown:
        outcome = by_id.get(item.id)
        params = {"layers": item.recipe.layers_text, "steps": item.recipe.steps,
                  "octaves": item.recipe.octaves, "step_size": item.recipe.step_size,
                  "seed": item.recipe.seed, **item.point}
        entries.append(GalleryEntry(item.output, Path(item.input).name, params,
                                    outcome.status if outcome else "missing",
                                    outcome.reason if outcome else ""))
    planned = {item.id for item in items}
    for outcome in outcomes:  # inputs that failed before they became items (missing, a FIFO)
        if outcome.status == "failed" and outcome.id not in planned:
            entries.append(GalleryEntry(config.output / Path(outcome.input).name,
                                        outcome.input, {}, "failed", outcome.reason))
    try:
        return write_gallery(config.output, entries, title=f"jaxdream: {config.source}",
                             summary=summary)
    except (JaxdreamError, OSError) as error:  # the message names the path at fault
        say(f"error: gallery not written: {error}")
        return None
