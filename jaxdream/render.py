"""Dreams image files into an output folder in this process: what ``jaxdream dream`` runs, and
what each Ray worker of ``jaxdream run`` runs on its units of work.

A job is planned into :class:`WorkItem` values (input, resolved recipe, output path, stable
id; see :mod:`jaxdream.planning`), then rendered by :func:`render_items`: images are loaded one
by one (a bad file becomes a failed outcome, never an exception), items that share a compiled
program (model, static settings) are handed to one engine, which buckets their shapes into few
programs, and each result is written atomically as a PNG that carries its recipe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import jax
import numpy as np
from tqdm import tqdm

from jaxdream import storage
from jaxdream.engine import CompileStats, bucket_shape, default_batch_size, item_params
from jaxdream.errors import JaxdreamError
from jaxdream.files import output_folder
from jaxdream.images import (DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS, _check_file_size,
                             _open_regular_file, load_rgb_bytes, png_bytes, save_png, to_uint8)
from jaxdream.models import load_model
from jaxdream.shards import MEMBER, read_member
from jaxdream.storage import is_url
from jaxdream.tables import read_row
from jaxdream.tiles import EngineKey, engine_key, make_engine
from jaxdream.recipe import Recipe

if TYPE_CHECKING:
    from jaxdream.config import JobConfig

#: Planning lives in :mod:`jaxdream.planning`; these names are found here too.
_PLANNING = frozenset({"output_stem", "output_stems", "output_paths", "variant_path", "item_id",
                       "plan", "plan_items", "plan_stream"})


def __getattr__(name: str) -> Any:
    if name in _PLANNING:
        from jaxdream import planning

        return getattr(planning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

Status = Literal["done", "failed", "skipped"]

_UNSAFE = re.compile(r"[^\w.\-]+", re.UNICODE)

#: Items loaded into memory at a time by :func:`render_items`; bounds memory on long folders
#: while still giving the engine enough same-bucket images to fill its batches.
CHUNK = 64


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One output to render: an input photo under one recipe."""

    id: str
    input: str
    output: Path
    recipe: Recipe
    point: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    input_sha256: str = ""
    #: Images declaring more pixels than this are refused before decoding (bombs).
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: Input files larger than this many bytes are refused before they are read.
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    #: For an input in an object store or on the web: what identified it when planned (URL,
    #: ETag, size; see :func:`jaxdream.storage.identity`); its bytes are hashed when read.
    input_identity: str = ""
    #: The object the output is uploaded to when the output is an object-store prefix.
    dest: str = ""
    #: For a local file: its size and modification time (ns) when planned (-1: not known);
    #: the worker refuses a file that no longer has them.
    input_size: int = -1
    input_mtime_ns: int = -1


@dataclasses.dataclass(frozen=True)
class Outcome:
    input: str
    output: Path | None
    status: Status
    reason: str = ""
    id: str = ""
    seconds: float = 0.0
    #: SHA-256 of the input's bytes as the worker read them ("" when it read none).
    input_sha256: str = ""
    #: Where a done output sits in a tar shard (``shard``, ``member``, ``offset``, ``size``;
    #: see :mod:`jaxdream.jobs.tarout`); None for a loose file or object.
    shard: Mapping[str, Any] | None = None


@dataclasses.dataclass
class Report:
    outcomes: list[Outcome]
    compile_stats: CompileStats
    render_seconds: float
    #: ``error:`` lines not tied to one input (a contact sheet or the gallery not written)
    problems: int = 0
    #: One-line suggestions for a faster run of the same job (:func:`speed_hints`).
    hints: list[str] = dataclasses.field(default_factory=list)


def _safe_stem(path: str) -> str:
    """A file-name stem that cannot escape a folder, hide, or pass for an option (of a URL:
    of its path, so that a presigned URL's signature never becomes a file name)."""
    stem = _UNSAFE.sub("_", Path(storage.redact(path) if is_url(path) else path).stem
                       ).strip("._-")
    return stem[:100] or "image"


def _file_sha256(path: str, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> str:
    """SHA-256 of a regular file (:func:`jaxdream.planning.file_sha256`)."""
    from jaxdream.planning import file_sha256

    return file_sha256(path, max_file_bytes)


def _read_failure(path: str, error: OSError) -> str:
    return f"{path}: {error.strerror or error}"


def _load(item: WorkItem) -> tuple[np.ndarray, str]:
    """The item's image and the SHA-256 of the bytes it came from."""
    if item.input_identity:
        # One read of the object: the same checks as a local file, on the bytes in memory.
        planned_as = json.loads(item.input_identity)
        if planned_as.get("shard") or planned_as.get("table"):  # a member or a row: checked
            data = (read_member if planned_as.get("shard") else read_row)(item.input, planned_as)
            where, part = item.input.rsplit(MEMBER, 1)
            name = storage.redact(where) + MEMBER + part
        else:
            data = storage.read_object(item.input)
            name = storage.redact(item.input)
            planned = planned_as.get("size")
            if isinstance(planned, int) and len(data) != planned:
                raise JaxdreamError(f"{name}: the object changed since the job was planned")
        image = load_rgb_bytes(data, name, max_side=item.recipe.max_side,
                               max_pixels=item.max_pixels, max_file_bytes=item.max_file_bytes)
        return image, hashlib.sha256(data).hexdigest()
    # One read of the file: its bytes are hashed (the id did not need them) and decoded.
    with _open_regular_file(item.input, item.input) as handle:
        info = os.fstat(handle.fileno())
        if (item.input_size >= 0 and (info.st_size, info.st_mtime_ns)
                != (item.input_size, item.input_mtime_ns)):
            raise JaxdreamError(f"{item.input}: the file changed since the job was planned")
        _check_file_size(handle, item.input, item.max_file_bytes)
        data = handle.read(item.max_file_bytes + 1)
    digest = hashlib.sha256(data).hexdigest()
    if item.input_sha256 and digest != item.input_sha256:
        raise JaxdreamError(f"{item.input}: the file changed since the job was planned")
    image = load_rgb_bytes(data, item.input, max_side=item.recipe.max_side,
                           max_pixels=item.max_pixels, max_file_bytes=item.max_file_bytes)
    return image, digest


def _chunks(items: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _load_chunk(items: Sequence[WorkItem], chunk: Sequence[int]
                ) -> list[tuple[int, tuple[np.ndarray, str] | str]]:
    """Each item's image, or the one-line reason it cannot be read. The variants of a grid
    share their photo: it is read and checked once per chunk."""
    decoded: dict[tuple[Any, ...], tuple[np.ndarray, str] | str] = {}
    loaded: list[tuple[int, tuple[np.ndarray, str] | str]] = []
    for index in chunk:
        item = items[index]
        key = (item.input, item.input_sha256, item.recipe.max_side, item.max_pixels,
               item.max_file_bytes)
        if key not in decoded:
            try:
                decoded[key] = _load(item)
            except JaxdreamError as error:
                decoded[key] = str(error)
            except OSError as error:
                decoded[key] = _read_failure(item.input, error)
        loaded.append((index, decoded[key]))
    return loaded


#: A whole-image job that compiled this many programs on a CPU hears of the tile engine.
HINT_PROGRAMS = 3
#: Photos of one size padded by at least this share of their pixels hear of exact sizes.
HINT_PADDING = 0.1


def speed_hints(key: EngineKey, sizes: set[tuple[int, int]], stats: CompileStats,
                backend: str) -> list[str]:
    """Suggestions for a faster run of a job that dreamed images of ``sizes`` (height, width)
    with the engine ``key`` (``stats`` its programs, on ``backend``): on a CPU, the tile
    engine once a job compiled a program per size bucket (README, Speed: compiling is most
    of a cold folder of mixed sizes); exact sizes for photos of one size in a larger buffer."""
    _, tiles, bucket = key
    if tiles or not sizes:
        return []
    hints = []
    if stats.compiled >= HINT_PROGRAMS and backend == "cpu":
        hints.append(f"hint: {stats.compiled} programs were compiled, one per size bucket; "
                     "--tiles 128 dreams every size with one program (a look of its own: "
                     "README, The tile engine)")
    if len(sizes) == 1 and bucket > 1:
        ((height, width),) = sizes
        padded_height, padded_width = bucket_shape(height, width, bucket)
        extra = padded_height * padded_width / (height * width) - 1
        if extra >= HINT_PADDING:
            hints.append(f"hint: {width}x{height} photos were dreamed in a "
                         f"{padded_width}x{padded_height} buffer ({extra:.0%} more pixels); "
                         "--shape-bucket 1 (shape_bucket: 1 in a config) dreams each at its "
                         "own size")
    return hints


def render_items(items: Sequence[WorkItem], *, weights: str | None = None,
                 batch_size: int | None = None, overwrite: bool = False, progress: bool = False,
                 on_outcome: Callable[[Outcome], None] | None = None,
                 report: Callable[[str], None] | None = None,
                 sink: Callable[[WorkItem, bytes], None] | None = None) -> Report:
    """Renders every item and writes its PNG; returns one outcome per item, in item order.

    Per-item problems (an unreadable or undecodable image, a failed write) become failed
    outcomes with a one-line reason and never stop the others. An existing output is skipped
    unless ``overwrite``. ``on_outcome`` is called as each item finishes. With ``sink``, each
    PNG is handed to it instead of being written (a tar shard collects them).
    """
    say = report or (lambda line: tqdm.write(line, file=sys.stderr))
    outcomes: list[Outcome | None] = [None] * len(items)
    stats = CompileStats()
    hints: list[str] = []
    start = time.perf_counter()

    def finish(index: int, outcome: Outcome) -> None:
        outcomes[index] = outcome
        if outcome.status == "failed":
            say(f"error: {outcome.reason}")
        if on_outcome is not None:
            on_outcome(outcome)

    # Items sharing a compiled program go to one engine; the engine buckets their shapes.
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, item in enumerate(items):
        recipe = item.recipe
        groups.setdefault((recipe.model, engine_key(recipe)), []).append(index)

    # No bar without items: tqdm would draw an empty one at start and again at close.
    bar = tqdm(total=len(items), unit="img", disable=not progress or not items,
               file=sys.stderr, desc="dreaming")
    try:
        for (model_name, key), members in groups.items():
            todo: list[int] = []
            for index in members:
                item = items[index]
                if not overwrite and not item.dest and item.output.exists():
                    finish(index, Outcome(item.input, item.output, "skipped",
                                          "output exists (pass --overwrite to replace it)",
                                          item.id))
                    bar.update(1)
                else:
                    todo.append(index)
            if not todo:
                continue
            model = load_model(model_name, weights)
            # tiles > 0: the tile engine (jaxdream.tiles), one program for every size.
            engine = make_engine(model, key, batch_size or default_batch_size())
            sizes: set[tuple[int, int]] = set()
            for chunk in _chunks(todo, CHUNK):
                images: list[np.ndarray] = []
                loaded: list[int] = []
                digests: list[str] = []
                for index, image in _load_chunk(items, chunk):
                    if isinstance(image, str):
                        item = items[index]
                        finish(index, Outcome(item.input, None, "failed", image, item.id))
                        bar.update(1)
                    else:
                        images.append(image[0])
                        digests.append(image[1])
                        loaded.append(index)
                sizes.update(image.shape[:2] for image in images)
                params = [item_params(items[index].recipe) for index in loaded]
                batch_start = time.perf_counter()
                for slot, result in engine.render_iter(images, params):
                    index = loaded[slot]
                    item = items[index]
                    seconds = time.perf_counter() - batch_start
                    finish(index, _write(item, result, model, seconds, digests[slot], sink))
                    batch_start = time.perf_counter()
                    bar.update(1)
            stats.add(engine.stats)
            hints += speed_hints(key, sizes, engine.stats, jax.default_backend())
    finally:
        bar.close()
    return Report([outcome for outcome in outcomes if outcome is not None], stats,
                  time.perf_counter() - start, hints=list(dict.fromkeys(hints)))


def _write(item: WorkItem, result: np.ndarray, model: Any, seconds: float,
           digest: str = "", sink: Callable[[WorkItem, bytes], None] | None = None) -> Outcome:
    digest = digest or item.input_sha256
    extra: dict[str, Any] = {
        "input": {"name": Path(storage.redact(item.input) if item.input_identity
                               else item.input).name, "sha256": digest,
                  "width": int(result.shape[1]), "height": int(result.shape[0])},
        "weights": model.weights_path.name, "id": item.id}
    if item.point:
        extra["grid"] = dict(item.point)
    recipe = item.recipe.to_json(weights_sha256=model.weights_sha256, extra=extra)
    try:
        if sink is not None:  # into a tar shard (jaxdream.jobs.tarout), written whole later
            sink(item, png_bytes(to_uint8(result), recipe))
        elif item.dest:  # one whole-object PUT: the object exists complete, or not at all
            storage.put_object(item.dest, png_bytes(to_uint8(result), recipe))
        else:
            item.output.parent.mkdir(parents=True, exist_ok=True)
            save_png(item.output, to_uint8(result), recipe)
    except storage.StorageError as error:
        return Outcome(item.input, None, "failed", str(error), item.id, seconds, digest)
    except (JaxdreamError, OSError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        return Outcome(item.input, None, "failed", f"{item.output}: cannot write: {reason}",
                       item.id, seconds, digest)
    return Outcome(item.input, item.output, "done", "", item.id, seconds, digest)


def dream_config(config: JobConfig, *, batch_size: int | None = None, overwrite: bool = False,
                 progress: bool = True, report: Callable[[str], None] | None = None,
                 gallery: bool = True) -> tuple[Report, Path | None]:
    """Runs a job config in this process (no Ray): every input under every grid variant,
    then (with ``gallery``) contact sheets and the gallery. Returns the report and the
    gallery's path. ``jaxdream dream`` runs this, from a config file or from its options."""
    if config.output_url:
        from jaxdream.errors import ConfigError

        raise ConfigError(f"{config.source}: output {storage.redact(config.output_url)} is an "
                          f"object-store prefix; write there with `jaxdream run`")
    if config.output_shards:
        from jaxdream.errors import ConfigError

        raise ConfigError(f"{config.source}: output_shards: tar-shard outputs are written by "
                          f"`jaxdream run`")
    output_folder(config.output)
    from jaxdream.planning import plan_items

    items, failures = plan_items(config)
    say = report or (lambda line: tqdm.write(line, file=sys.stderr))
    for failure in failures:
        say(f"error: {failure.reason}")
    result = render_items(items, weights=config.weights,
                          batch_size=batch_size or config.job.batch_size, overwrite=overwrite,
                          progress=progress, report=report)
    result.outcomes = [*failures, *result.outcomes]
    if not gallery:
        return result, None
    from jaxdream.gallery import sheets_and_gallery

    counted = _ErrorCounter(report or (lambda line: tqdm.write(line, file=sys.stderr)))
    path = sheets_and_gallery(config, items, result.outcomes, report=counted)
    result.problems += counted.errors
    return result, path


class _ErrorCounter:
    """Passes report lines on, counting the ``error:`` ones (each must fail the exit status)."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.errors = 0

    def __call__(self, line: str) -> None:
        self.errors += line.startswith("error:")
        self.say(line)
