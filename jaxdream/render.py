"""Dreams image files into an output folder in this process: what ``jaxdream dream`` runs, and
what each Ray worker of ``jaxdream run`` runs on its units of work.

A job is planned into :class:`WorkItem` values (input, resolved recipe, output path, stable id),
then rendered by :func:`render_items`: images are loaded one by one (a bad file becomes a failed
outcome, never an exception), items that share a compiled program (model, static settings) are
handed to one engine, which buckets their shapes into few programs, and each result is written
atomically as a PNG that carries its recipe.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from tqdm import tqdm

from jaxdream import __version__, storage
from jaxdream.engine import (CompileStats, Engine, default_batch_size, item_params,
                             static_settings)
from jaxdream.errors import JaxdreamError
from jaxdream.files import output_folder
from jaxdream.images import (DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS, load_rgb, load_rgb_bytes,
                             png_bytes, save_png, to_uint8)
from jaxdream.models import load_model, weights_sha256
from jaxdream.shards import MEMBER, read_member
from jaxdream.storage import is_url
from jaxdream.tables import read_row
from jaxdream.recipe import Recipe

if TYPE_CHECKING:
    from jaxdream.config import JobConfig

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


def _safe_stem(path: str) -> str:
    """A file-name stem that cannot escape a folder, hide, or pass for an option (of a URL:
    of its path, so that a presigned URL's signature never becomes a file name)."""
    stem = _UNSAFE.sub("_", Path(storage.redact(path) if is_url(path) else path).stem
                       ).strip("._-")
    return stem[:100] or "image"


def output_stems(inputs: Sequence[str], outdir: Path, output_url: str = "") -> list[str]:
    """Deterministic, unique output stems, one per input, safe as file names.

    Inputs whose names would collide (``a/cat.jpg`` and ``b/cat.png``) get a short hash of the
    path as given, so the same command always writes the same names; so does a name whose
    output would land on an input (a file, or an object when the output is ``output_url``).
    """
    stems = [_safe_stem(path) for path in inputs]
    # Only what can be overwritten is compared: files with files, objects with objects (a
    # million realpath calls on URLs would cost minutes and find nothing).
    local_inputs = {os.path.realpath(path) for path in inputs
                    if not output_url and not is_url(path)}
    remote_inputs = {path for path in inputs if output_url and is_url(path)}

    def lands_on_input(name: str) -> bool:
        if output_url:
            return storage.join(output_url, name) in remote_inputs
        return bool(local_inputs) and os.path.realpath(outdir / name) in local_inputs

    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    unique: list[str] = []
    for path, stem in zip(inputs, stems, strict=True):
        clash = any(lands_on_input(f"{stem}{suffix}") for suffix in ("_dream.png", "_grid.png"))
        if counts[stem] > 1 or clash:
            digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:8]
            stem = f"{stem}_{digest}"
        unique.append(stem)
    return unique


def output_paths(inputs: Sequence[str], outdir: Path) -> list[Path]:
    """``OUTDIR/<stem>_dream.png`` for each input (see :func:`output_stems`)."""
    return [outdir / f"{stem}_dream.png" for stem in output_stems(inputs, outdir)]


def variant_path(outdir: Path, stem: str, variant: int, variants: int) -> Path:
    """``<stem>_dream.png`` for a single recipe, ``<stem>_dream_007.png`` within a grid."""
    if variants == 1:
        return outdir / f"{stem}_dream.png"
    return outdir / f"{stem}_dream_{variant:0{len(str(variants - 1))}d}.png"


def item_id(input_sha256: str, recipe: Recipe, model_weights_sha256: str,
            guide_sha256: str | None = None) -> str:
    """A stable id: the same photo, parameters, weights and jaxdream version give the same id."""
    # The text json.dumps(identity, sort_keys=True, separators=(",", ":")) gives for
    # {"input", "guide", "jaxdream", "recipe"}, with the recipe's part made once per recipe:
    # a plan of a million items would otherwise serialise the same recipe a million times.
    dump = functools.partial(json.dumps, separators=(",", ":"))
    text = (f'{{"guide":{dump(guide_sha256)},"input":{dump(input_sha256)},'
            f'"jaxdream":{dump(__version__)},'
            f'"recipe":{_recipe_text(recipe, model_weights_sha256)}}}')
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=256)
def _recipe_text(recipe: Recipe, model_weights_sha256: str) -> str:
    return json.dumps(recipe.to_json(weights_sha256=model_weights_sha256), sort_keys=True,
                      separators=(",", ":"))


def _file_sha256(path: str, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> str:
    """SHA-256 of a regular file; a pipe, device, folder, empty file or one larger than
    ``max_file_bytes`` is an ImageError (a named pipe called photo.jpg must not hang the job,
    a 50 GB file must not be read to be refused)."""
    from jaxdream.images import _check_file_size, _open_regular_file

    with _open_regular_file(path, path) as handle:
        _check_file_size(handle, path, max_file_bytes)
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _read_failure(path: str, error: OSError) -> str:
    return f"{path}: {error.strerror or error}"


def plan(inputs: Sequence[str], outdir: str | os.PathLike[str],
         variants: Sequence[tuple[Recipe, Mapping[str, Any]]], *,
         weights: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
         max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, output_url: str = ""
         ) -> tuple[list[WorkItem], list[Outcome]]:
    """Work items for every input under every recipe, and failures for unreadable inputs.

    Each local input is hashed here (its content is part of every item's id); an object or
    URL is identified by its listing instead (ETag, size), never read here. An input that
    cannot be read becomes one failed outcome instead of items. Images are not decoded: a
    file that is not an image is reported when a worker loads it. With ``output_url`` (an
    object-store prefix) each item's output is uploaded there under its output's name.
    """
    out = Path(outdir)
    stems = output_stems(inputs, out, output_url)
    identities = {recipe.model: weights_sha256(recipe.model, weights) for recipe, _ in variants}
    # A guide image is part of every item's identity; one that cannot be read stops the job
    # before it starts (it is a setting, not one bad input among many).
    guides = {recipe.guide: _file_sha256(recipe.guide)
              for recipe, _ in variants if recipe.guide}
    items: list[WorkItem] = []
    failures: list[Outcome] = []
    for path, stem in zip(inputs, stems, strict=True):
        identity = storage.known_identity(path) or ""  # listed objects, shard members
        try:
            if not identity and is_url(path):
                identity = storage.identity(path)
            if identity:
                digest = hashlib.sha256(identity.encode()).hexdigest()
            else:
                digest = _file_sha256(path, max_file_bytes)
        except JaxdreamError as error:
            failures.append(Outcome(path, None, "failed", str(error)))
            continue
        except OSError as error:
            failures.append(Outcome(path, None, "failed", _read_failure(path, error)))
            continue
        for index, (recipe, point) in enumerate(variants):
            guide = guides[recipe.guide] if recipe.guide else None
            output = variant_path(out, stem, index, len(variants))
            items.append(WorkItem(
                id=item_id(digest, recipe, identities[recipe.model], guide), input=path,
                output=output, recipe=recipe, point=dict(point),
                input_sha256="" if identity else digest, max_pixels=max_pixels,
                max_file_bytes=max_file_bytes, input_identity=identity,
                dest=storage.join(output_url, output.name) if output_url else ""))
    return items, failures


def plan_items(config: JobConfig) -> tuple[list[WorkItem], list[Outcome]]:
    """:func:`plan` for a loaded job config (inputs expanded, every grid variant); with
    ``config.lenient_inputs`` an input entry that yields no image is one more failure."""
    from jaxdream.inputs import expand_inputs

    unmatched: list[tuple[str, str]] | None = [] if config.lenient_inputs else None
    inputs = expand_inputs(config.inputs, source=f"{config.source}: inputs", failures=unmatched,
                           outdir=config.output, image_column=config.image_column)
    if config.recipe_weights_sha256 is not None:
        actual = weights_sha256(config.model, config.weights)
        if actual != config.recipe_weights_sha256:
            raise JaxdreamError(
                f"recipe {config.recipe} was rendered with weights sha256 "
                f"{config.recipe_weights_sha256[:16]}..., but the loaded weights are "
                f"{actual[:16]}...; pass --weights with the matching file")
    items, failures = plan(inputs, config.output,
                           [(v.recipe, v.point) for v in config.variants],
                           weights=config.weights, max_pixels=config.max_pixels,
                           max_file_bytes=config.max_file_bytes,
                           output_url=config.output_url)
    return items, [Outcome(entry, None, "failed", reason)
                   for entry, reason in unmatched or ()] + failures


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
    image = load_rgb(item.input, max_side=item.recipe.max_side, max_pixels=item.max_pixels,
                     max_file_bytes=item.max_file_bytes)
    if (item.input_sha256
            and _file_sha256(item.input, item.max_file_bytes) != item.input_sha256):
        raise JaxdreamError(f"{item.input}: the file changed since the job was planned")
    return image, item.input_sha256


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
        groups.setdefault((recipe.model, static_settings(recipe)), []).append(index)

    # No bar without items: tqdm would draw an empty one at start and again at close.
    bar = tqdm(total=len(items), unit="img", disable=not progress or not items,
               file=sys.stderr, desc="dreaming")
    try:
        for (model_name, settings), members in groups.items():
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
            engine = Engine(model, settings, batch_size=batch_size or default_batch_size())
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
    finally:
        bar.close()
    return Report([outcome for outcome in outcomes if outcome is not None], stats,
                  time.perf_counter() - start)


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
