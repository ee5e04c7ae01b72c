"""Planning a job: input entries in, work items out, as a stream.

:func:`plan_stream` yields a :class:`~jaxdream.render.WorkItem` for each input under each
recipe (and a failed :class:`~jaxdream.render.Outcome` for an input that cannot be planned) as
the inputs are listed, so that ``jaxdream run`` sends its first unit while a bucket of a
million objects is still being listed. Nothing here reads an input's bytes: an item's id comes
from what identifies the input (a file's absolute path, size and modification time in
nanoseconds; an object's URL, ETag and size; a shard member's or a table row's place in its
container), the recipe, the weights and the jaxdream version. The worker hashes the bytes it
reads and records that hash (manifest row, the PNG's recipe); a file that changed size or
modification time since it was planned fails there with "the file changed since the job was
planned", and a later ``--resume`` plans it under a new id and renders it again.

Output names (one rule, :func:`output_stem`): ``<stem>_dream.png``, the input's file stem made
safe, then, where needed, ``_`` and 8 hex digits of SHA-256 of the input as given (a URL
without its query). Inputs that are listed from a store or a container (objects, URLs, shard
members, table rows) always get the digest: their name is then decided by the input alone,
unique by construction, and independent of the listing's order and of the other inputs, so the
first unit can go out before the listing ends. Local files keep the short name and get the
digest only when another local input of the job has the same stem, or the name would land on
an input (:func:`output_stems`): the local inputs are listed in full before their items are
made, which is cheap (no network round trip per object), and users and scripts rely on
``OUT/<stem>_dream.png``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxdream import __version__, storage
from jaxdream.errors import JaxdreamError
from jaxdream.images import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS
from jaxdream.recipe import Recipe
from jaxdream.render import Outcome, WorkItem, _read_failure, _safe_stem
from jaxdream.storage import is_url

if TYPE_CHECKING:
    from jaxdream.config import JobConfig

Variants = Sequence[tuple[Recipe, Mapping[str, Any]]]


def _digest8(path: str) -> str:
    key = storage.redact(path) if is_url(path) else path
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def output_stem(path: str, hashed: bool) -> str:
    """The output stem of one input: its file stem made safe (of a URL: of its path, so that a
    presigned URL's signature never becomes a file name), with ``_<8 hex digits>`` of SHA-256
    of the input as given (a URL without user, password or query) when ``hashed``."""
    stem = _safe_stem(path)
    return f"{stem}_{_digest8(path)}" if hashed else stem


def output_stems(inputs: Sequence[str], outdir: Path, output_url: str = "") -> list[str]:
    """Output stems of local inputs listed in full (:func:`output_stem`): the digest only for
    inputs whose stems collide (``a/cat.jpg`` and ``b/cat.png``) or whose output would land on
    an input (a file, or an object when the output is ``output_url``), so the same command
    always writes the same names."""
    stems = [_safe_stem(path) for path in inputs]
    # Only what can be overwritten is compared: files with files, objects with objects.
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
    return [output_stem(path, counts[stem] > 1 or any(
                lands_on_input(f"{stem}{suffix}") for suffix in ("_dream.png", "_grid.png")))
            for path, stem in zip(inputs, stems, strict=True)]


def output_paths(inputs: Sequence[str], outdir: Path) -> list[Path]:
    """``OUTDIR/<stem>_dream.png`` for each input (see :func:`output_stems`)."""
    return [outdir / f"{stem}_dream.png" for stem in output_stems(inputs, outdir)]


def variant_path(outdir: Path, stem: str, variant: int, variants: int) -> Path:
    """``<stem>_dream.png`` for a single recipe, ``<stem>_dream_007.png`` within a grid."""
    if variants == 1:
        return outdir / f"{stem}_dream.png"
    return outdir / f"{stem}_dream_{variant:0{len(str(variants - 1))}d}.png"


def item_id(input_identity: str, recipe: Recipe, model_weights_sha256: str,
            guide_sha256: str | None = None) -> str:
    """A stable id: the same input (its identity digest), parameters, weights and jaxdream
    version give the same id."""
    # The text json.dumps(identity, sort_keys=True, separators=(",", ":")) gives for
    # {"input", "guide", "jaxdream", "recipe"}, with the recipe's part made once per recipe:
    # a plan of a million items would otherwise serialise the same recipe a million times.
    dump = functools.partial(json.dumps, separators=(",", ":"))
    text = (f'{{"guide":{dump(guide_sha256)},"input":{dump(input_identity)},'
            f'"jaxdream":{dump(__version__)},'
            f'"recipe":{_recipe_text(recipe, model_weights_sha256)}}}')
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=256)
def _recipe_text(recipe: Recipe, model_weights_sha256: str) -> str:
    return json.dumps(recipe.to_json(weights_sha256=model_weights_sha256), sort_keys=True,
                      separators=(",", ":"))


def file_identity(path: str, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
                  ) -> tuple[str, os.stat_result]:
    """What identifies a local file without reading it: its absolute path, size and
    modification time (ns), as JSON text, and its stat. A file that is not a regular file
    (a pipe, a device, a folder, missing) or larger than ``max_file_bytes`` is an ImageError
    naming it, as the worker would word it."""
    from jaxdream.images import _fail, _open_regular_file

    try:
        info = os.stat(path)
    except (OSError, ValueError):
        info = None
    if info is None or not stat.S_ISREG(info.st_mode):
        with _open_regular_file(path, path):  # raises the one-line reason
            pass
        raise _fail(path, "is not a regular file")
    if info.st_size > max_file_bytes:
        raise _fail(path, f"file too large: {info.st_size} bytes exceeds the limit of "
                          f"{max_file_bytes} (max_file_bytes; refused before reading)")
    text = json.dumps({"path": os.path.abspath(path), "size": info.st_size,
                       "mtime_ns": info.st_mtime_ns}, sort_keys=True)
    return text, info


def file_sha256(path: str, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> str:
    """SHA-256 of a regular file (a guide image); a pipe, device, folder or a file larger
    than ``max_file_bytes`` is an ImageError."""
    from jaxdream.images import _check_file_size, _open_regular_file

    with _open_regular_file(path, path) as handle:
        _check_file_size(handle, path, max_file_bytes)
        return hashlib.file_digest(handle, "sha256").hexdigest()


class Planner:
    """Makes the items of one input at a time (its variants), for :func:`plan_stream`."""

    def __init__(self, outdir: str | os.PathLike[str], variants: Variants, *,
                 weights: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, output_url: str = "") -> None:
        from jaxdream.models import weights_sha256

        self.out = Path(outdir)
        self.variants = [(recipe, dict(point)) for recipe, point in variants]
        self.max_pixels, self.max_file_bytes = max_pixels, max_file_bytes
        self.output_url = output_url
        self.weights = {recipe.model: weights_sha256(recipe.model, weights)
                        for recipe, _ in variants}
        # A guide image is part of every item's identity; one that cannot be read stops the
        # job before it starts (it is a setting, not one bad input among many).
        self.guides = {recipe.guide: file_sha256(recipe.guide)
                       for recipe, _ in variants if recipe.guide}

    def items(self, path: str, identity: str, stem: str) -> list[WorkItem] | Outcome:
        """The items of ``path`` (identity: what its listing recorded, "" for none), or the
        failed outcome of an input that cannot be planned."""
        size = mtime_ns = -1
        try:
            if not identity and is_url(path):
                identity = storage.identity(path)  # one HEAD: a URL named on its own
            if identity:
                digest = hashlib.sha256(identity.encode()).hexdigest()
            else:
                text, info = file_identity(path, self.max_file_bytes)
                digest = hashlib.sha256(text.encode()).hexdigest()
                size, mtime_ns = info.st_size, info.st_mtime_ns
        except JaxdreamError as error:
            return Outcome(path, None, "failed", str(error))
        except OSError as error:
            return Outcome(path, None, "failed", _read_failure(path, error))
        found: list[WorkItem] = []
        for index, (recipe, point) in enumerate(self.variants):
            guide = self.guides[recipe.guide] if recipe.guide else None
            output = variant_path(self.out, stem, index, len(self.variants))
            found.append(WorkItem(
                id=item_id(digest, recipe, self.weights[recipe.model], guide), input=path,
                output=output, recipe=recipe, point=point, max_pixels=self.max_pixels,
                max_file_bytes=self.max_file_bytes, input_identity=identity,
                input_size=size, input_mtime_ns=mtime_ns,
                dest=storage.join(self.output_url, output.name) if self.output_url else ""))
        return found


def stream(planner: Planner, found: Iterable[tuple[str, str, str]]
           ) -> Iterator[WorkItem | Outcome]:
    """Items (and failures) for ``found`` (path, identity, failure reason) as it comes: a
    listed object or member at once, under its digest name; local files once ``found`` ends,
    under their short names (see the module's doc)."""
    local: list[str] = []
    for path, identity, failure in found:
        if failure:
            yield Outcome(path, None, "failed", failure)
        elif identity or is_url(path):
            yield from _planned(planner.items(path, identity, output_stem(path, True)))
        else:
            local.append(path)
    stems = output_stems(local, planner.out, planner.output_url)
    for path, stem in zip(local, stems, strict=True):
        yield from _planned(planner.items(path, "", stem))


def _planned(made: list[WorkItem] | Outcome) -> Iterator[WorkItem | Outcome]:
    if isinstance(made, Outcome):
        yield made
    else:
        yield from made


def plan(inputs: Iterable[str | tuple[str, str]], outdir: str | os.PathLike[str],
         variants: Variants, *, weights: str | None = None,
         max_pixels: int = DEFAULT_MAX_PIXELS, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
         output_url: str = "") -> tuple[list[WorkItem], list[Outcome]]:
    """Work items for every input (a path or URL, or (path, identity)) under every recipe,
    and failures for inputs that cannot be planned: :func:`stream`, as lists."""
    planner = Planner(outdir, variants, weights=weights, max_pixels=max_pixels,
                      max_file_bytes=max_file_bytes, output_url=output_url)
    found = ((entry, storage.known_identity(entry) or "", "") if isinstance(entry, str)
             else (entry[0], entry[1], "") for entry in inputs)
    items: list[WorkItem] = []
    failures: list[Outcome] = []
    for planned in stream(planner, found):
        (failures if isinstance(planned, Outcome) else items).append(planned)  # type: ignore
    return items, failures


def plan_stream(config: JobConfig) -> Iterator[WorkItem | Outcome]:
    """The items of a loaded job config (inputs listed as they come, every grid variant) and
    a failed outcome for each input that cannot be planned; with ``config.lenient_inputs``
    an input entry that yields no image is one such failure too. A bad config (an entry that
    matches nothing, weights that do not match a recipe) raises ConfigError or JaxdreamError
    before the first item comes out: every entry is opened first (see
    :func:`jaxdream.inputs.iter_inputs`), then listed as it is taken."""
    from jaxdream.inputs import iter_inputs
    from jaxdream.models import weights_sha256

    if config.recipe_weights_sha256 is not None:
        actual = weights_sha256(config.model, config.weights)
        if actual != config.recipe_weights_sha256:
            raise JaxdreamError(
                f"recipe {config.recipe} was rendered with weights sha256 "
                f"{config.recipe_weights_sha256[:16]}..., but the loaded weights are "
                f"{actual[:16]}...; pass --weights with the matching file")
    planner = Planner(config.output, [(v.recipe, v.point) for v in config.variants],
                      weights=config.weights, max_pixels=config.max_pixels,
                      max_file_bytes=config.max_file_bytes, output_url=config.output_url)
    return stream(planner, iter_inputs(config.inputs, source=f"{config.source}: inputs",
                                       lenient=config.lenient_inputs, outdir=config.output,
                                       image_column=config.image_column))


def plan_items(config: JobConfig) -> tuple[list[WorkItem], list[Outcome]]:
    """:func:`plan_stream` as lists: (items, failures)."""
    items: list[WorkItem] = []
    failures: list[Outcome] = []
    for planned in plan_stream(config):
        (failures if isinstance(planned, Outcome) else items).append(planned)  # type: ignore
    return items, failures
