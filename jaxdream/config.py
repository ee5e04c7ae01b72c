"""Job configs: one strict YAML schema for single dreams, parameter grids and cluster jobs.

A config names inputs, an output folder, the model, the dream's settings (``dream:``), an
optional ``grid:`` of settings to vary (their cartesian product in file order; first axis =
rows of a contact sheet) and an optional ``job:`` for ``jaxdream run``; ``configs/`` holds
examples. Configs are untrusted: read with ``yaml.safe_load`` only, capped in size and in what
their aliases expand to, every key and value checked, every grid variant validated before any
work starts. Errors are one-line ConfigErrors naming the file, the key path (``dream.steps``,
``grid.step_size[2]``) and the reason.

Relative paths (inputs, output, weights, guide) resolve against the current working directory,
as on the command line; only the lines of a ``.txt`` input list resolve against its folder.
A grid may vary any recipe field but ``model`` (a job loads one network) and ``preset`` (it
gives the base values that the other keys override). A key is set in ``dream`` (``max_side`` at
the top level) or is a grid axis, not both.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import itertools
import math
import os
import reprlib
import stat
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from jaxdream.errors import ConfigError
from jaxdream.images import DEFAULT_MAX_PIXELS
from jaxdream.models import DEFAULT_MODEL, MODELS, ModelSpec
from jaxdream.objectives import format_layers, parse_layers
from jaxdream.recipe import PRESETS, Recipe

#: Extensions picked up by folders and globs (files named or listed explicitly are all kept).
IMAGE_EXTENSIONS = frozenset(".jpg .jpeg .png .gif .bmp .tif .tiff .webp .ppm".split())
MAX_FILE_BYTES = 1 << 20
#: Values once aliases are expanded: 1 MiB holds ~500,000 without aliases; only a bomb gets here.
MAX_VALUES = 1_000_000
MAX_VARIANTS = 10_000


@dataclasses.dataclass(frozen=True)
class JobSettings:
    """The cluster side of a config (``job:``), read by ``jaxdream run``."""

    workers: int | None = None  #: None: as many as the cluster allows
    cpus_per_worker: int = 1
    gpus_per_worker: float | None = None  #: None: 1 if the cluster has GPUs, else 0
    batch_size: int | None = None  #: None: the engine's default for the device
    unit_size: int = 8  #: items per unit of work sent to a worker
    retries: int = 3  #: times a unit is retried after its worker dies


@dataclasses.dataclass(frozen=True)
class Variant:
    """One point of the grid: its full, validated recipe and the grid values that made it."""

    recipe: Recipe
    #: axis -> normalised value (layers as canonical ``format_layers`` text); {} without a grid.
    point: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """A checked config: what to dream, into where, with which variants, and how to spread it."""

    source: str  #: the config file path as given, used in messages
    inputs: tuple[str, ...]  #: entries as written; see :func:`expand_inputs`
    output: Path
    model: str
    weights: str | None
    variants: tuple[Variant, ...]  #: row-major in grid-axis order; one without a grid
    grid: tuple[tuple[str, tuple[Any, ...]], ...]  #: (axis, normalised values) in file order
    job: JobSettings
    #: Images declaring more pixels than this are refused before decoding (bombs).
    max_pixels: int = DEFAULT_MAX_PIXELS


_RECIPE_TYPES = typing.get_type_hints(Recipe)
_JOB_TYPES = typing.get_type_hints(JobSettings)
_JOB_MINIMUM = {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0, "batch_size": 1,
                "unit_size": 1, "retries": 0}
_SECTIONS = ("dream", "grid", "job")
_VALUE_KEYS = ("inputs", "output", "model", "weights", "max_side", "max_pixels")
TOP_KEYS = (*_VALUE_KEYS, *_SECTIONS)
_FIELDS = tuple(field.name for field in dataclasses.fields(Recipe))
DREAM_KEYS = tuple(name for name in _FIELDS if name not in ("model", "max_side"))
GRID_KEYS = tuple(name for name in _FIELDS if name not in ("model", "preset"))
JOB_KEYS = tuple(f.name for f in dataclasses.fields(JobSettings))
_OVERRIDE_KEYS = (*_VALUE_KEYS, *DREAM_KEYS, *JOB_KEYS)
_MISPLACED = {
    "dream.model": "set the model at the top level, not under dream",
    "dream.max_side": "set max_side at the top level, not under dream",
    "grid.model": "cannot be a grid axis: a job runs one model (its weights load once)",
    "grid.preset": "cannot be a grid axis: the preset gives the base values; vary the fields",
}

# Short reprs keep messages to one readable line whatever a hostile file holds.
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 2, 4, 4
_show = _SHORT.repr


def _suggest(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"


def _expanded_size(node: Any, sizes: dict[int, int]) -> int:
    """Values in ``node`` with aliases expanded, each shared object sized once, so a YAML bomb
    is measured, never expanded. A value containing itself ends in RecursionError."""
    if not isinstance(node, (list, dict, set)):
        return 1
    if id(node) not in sizes:
        children = node.values() if isinstance(node, dict) else node
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def _duplicate_key(node: yaml.Node, path: str, seen: set[int]) -> str | None:
    """The first key written twice in one mapping, as ``path (lines A and B)``, or None. Nodes
    reached again through an alias are walked once, so an alias bomb costs its size on disk."""
    if id(node) in seen:
        return None
    seen.add(id(node))
    children: list[tuple[str, yaml.Node]] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            name = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
            child = f"{path}.{name}" if path else name
            if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                line = key.start_mark.line + 1
                if (key.tag, key.value) in first:
                    return (f"{_show(child)[1:-1]}: duplicate key (lines "
                            f"{first[key.tag, key.value]} and {line}); give each key once")
                first[key.tag, key.value] = line
            children.append((child, value))
    elif isinstance(node, yaml.SequenceNode):
        children = [(f"{path}[{i}]", item) for i, item in enumerate(node.value)]
    for child, value in children:
        found = _duplicate_key(value, child, seen)
        if found:
            return found
    return None


def _load_unique_keys(source: str, text: str) -> Any:
    """yaml.safe_load, refusing a key given twice in one mapping (PyYAML keeps the last one
    silently, so ``output:`` written twice would quietly change where results go)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        duplicate = _duplicate_key(node, "", set())
        if duplicate:
            raise ConfigError(f"{source}: {duplicate}")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _read_yaml(source: str) -> dict[Any, Any]:
    try:
        with open(source, "rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
    except (OSError, ValueError) as error:  # ValueError: a NUL in the path
        raise ConfigError(f"{source}: cannot read the config: "
                          f"{getattr(error, 'strerror', None) or error}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{source}: too large for a config (over {MAX_FILE_BYTES} bytes)")
    try:
        data = _load_unique_keys(source, raw.decode("utf-8"))
        size = _expanded_size(data, {})
    except UnicodeDecodeError as error:
        raise ConfigError(f"{source}: not UTF-8 text (byte {error.start})") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as error:
        # ValueError and friends come from PyYAML's own constructors (e.g. the date 2024-13-45);
        # its own errors quote the text over several lines, so take the problem and its place.
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = " ".join(str(getattr(error, "problem", None) or error).split())
        raise ConfigError(f"{source}: not valid YAML: {reason}{where}") from None
    except RecursionError:
        raise ConfigError(f"{source}: refused: nested too deeply, or a value contains itself "
                          f"(recursive alias)") from None
    if data is None:
        raise ConfigError(f"{source}: the config is empty")
    if size > MAX_VALUES:
        raise ConfigError(f"{source}: refused: more than {MAX_VALUES} values once aliases are "
                          f"expanded")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys "
                          f"({', '.join(TOP_KEYS)}), got {type(data).__name__}")
    return data


class _Reader:
    """Checks one parsed config; every error names ``source`` and a key path."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.canonical: dict[str, str] = {}  # layers text as given -> canonical text
        self.pairs: dict[str, tuple[tuple[str, float], ...]] = {}  # canonical text -> layers

    def fail(self, path: str, reason: str) -> ConfigError:
        return ConfigError(" ".join(f"{self.source}: {path}: {reason}".splitlines()))

    def expected(self, path: str, kind: str, value: Any) -> NoReturn:
        raise self.fail(path, f"expected {kind}, got {_show(value)}")

    def section(self, data: dict[Any, Any], name: str, known: Sequence[str]) -> dict[str, Any]:
        """``data[name]`` ({} if absent or null), its keys checked against ``known``."""
        value = data.get(name) if name else data
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.expected(name, "a mapping of keys", value)
        for key in value:
            if not isinstance(key, str):
                raise self.fail(name or "top level", f"keys must be names, got {_show(key)}")
            path = f"{name}.{key}" if name else key
            if key not in known:
                raise self.fail(path, _MISPLACED.get(path, f"unknown key; {_suggest(key, known)}"))
        return value

    def typed(self, value: Any, hint: Any, path: str) -> Any:
        """``value`` checked against a dataclass field's type (the few kinds recipes use)."""
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            (hint,) = [arg for arg in args if arg is not type(None)]
            return self.typed(value, hint, path)
        if hint in (int, str) and isinstance(value, hint) and not isinstance(value, bool):
            return value
        if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise self.fail(path, f"number too large: {_show(value)}") from None
        if origin is tuple and args[1:] == (Ellipsis,):
            if not isinstance(value, list):
                self.expected(path, "a list", value)
            return tuple(self.typed(item, args[0], f"{path}[{i}]") for i, item in enumerate(value))
        # A KeyError here means a Recipe field of a new type: teach this function about it.
        self.expected(path, {int: "an integer", float: "a number", str: "text"}[hint], value)

    def path_text(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value or "\0" in value:
            self.expected(path, "a path", value)
        return value

    def layers(self, value: Any, path: str, spec: ModelSpec) -> str:
        """A layers string or {endpoint: weight} mapping, as canonical ``format_layers`` text."""
        if isinstance(value, dict):
            weights: dict[str, float] = {}
            for name, weight in value.items():
                if not isinstance(name, str):
                    raise self.fail(path, f"layer names must be text, got {_show(name)}")
                weights[name] = self.typed(weight, float, f"{path}.{name}")
                if not math.isfinite(weights[name]):
                    raise self.fail(f"{path}.{name}", f"weight must be finite, got {weight}")
            value = format_layers(weights)
        elif not isinstance(value, str):
            self.expected(path, "'block8:1,block10:2' or a mapping {block8: 1, block10: 2}",
                          value)
        if value not in self.canonical:  # each text is parsed once, however many variants
            try:
                parsed = parse_layers(value, list(spec.endpoints))
            except ConfigError as error:
                raise self.fail(path, f"{str(error).removeprefix('layers: ')} "
                                      f"(model {spec.name})") from None
            self.canonical[value] = format_layers(parsed)
            self.pairs[self.canonical[value]] = tuple(parsed.items())
        return self.canonical[value]

    def field(self, name: str, value: Any, path: str, spec: ModelSpec) -> Any:
        """One recipe value, type-checked and normalised; ranges are Recipe.validate's job."""
        if name == "layers":
            return self.layers(value, path, spec)
        if name == "max_side" and type(value) is int and value == 0:
            return None  # 0, like null, keeps the input's size (as --max-side 0 does)
        if name == "preset" and isinstance(value, str) and value not in PRESETS:
            raise self.fail(path, f"unknown preset {value!r}; {_suggest(value, list(PRESETS))}")
        if name == "guide" and value is not None:
            return self.path_text(value, path)
        return self.typed(value, _RECIPE_TYPES[name], path)

    def variant(self, base: dict[str, Any], where: dict[str, str],
                axes: list[tuple[str, tuple[Any, ...]]], indices: tuple[int, ...],
                spec: ModelSpec) -> Variant:
        point = {name: values[i] for (name, values), i in zip(axes, indices)}
        where = {**where, **{name: f"grid.{name}[{i}]" for (name, _), i in zip(axes, indices)}}
        values = {**base, **point}
        layers = values.pop("layers", None)
        recipe = dataclasses.replace(PRESETS[values.get("preset", "classic")], model=spec.name,
                                     **values)
        if layers is None:
            layers = recipe.layers_text if recipe.layers is not None else spec.default_layers
            layers = self.layers(layers, where.get("layers", "dream.layers"), spec)
        recipe = dataclasses.replace(recipe, layers=self.pairs[layers])
        try:
            recipe.validate(self.source)
        except ConfigError as error:
            key, _, reason = str(error).removeprefix(f"{self.source}: ").partition(": ")
            if point and key not in point:  # the fault lies in a combination: name it
                reason += f" (grid point {', '.join(f'{k}={_show(v)}' for k, v in point.items())})"
            raise self.fail(where.get(key, f"dream.{key}"), reason) from None
        return Variant(recipe, point)

    def build(self, data: dict[Any, Any]) -> JobConfig:
        self.section(data, "", TOP_KEYS)
        for key in ("inputs", "output"):
            if data.get(key) is None:
                raise self.fail(key, "missing; every config names its inputs and output folder")
        entries = [data["inputs"]] if isinstance(data["inputs"], str) else data["inputs"]
        if not isinstance(entries, (list, tuple)) or not entries:
            self.expected("inputs", "a path or a non-empty list of paths", data["inputs"])
        inputs = tuple(self.path_text(e, f"inputs[{i}]") for i, e in enumerate(entries))
        output = self.path_text(data["output"], "output")
        model = self.typed(data.get("model", DEFAULT_MODEL), str, "model")
        if model not in MODELS:
            raise self.fail("model", f"unknown model {model!r}; {_suggest(model, list(MODELS))}")
        spec = MODELS[model]
        weights = data.get("weights")
        weights = None if weights is None else self.path_text(weights, "weights")
        max_pixels = self.typed(data.get("max_pixels", DEFAULT_MAX_PIXELS), int, "max_pixels")
        if max_pixels < 16 * 16:
            raise self.fail("max_pixels", f"must be at least 256 (16 x 16), got {max_pixels}")

        base: dict[str, Any] = {}
        where: dict[str, str] = {}  # recipe field -> the key path that set it
        if "max_side" in data:
            base["max_side"] = self.field("max_side", data["max_side"], "max_side", spec)
            where["max_side"] = "max_side"
        for key, value in self.section(data, "dream", DREAM_KEYS).items():
            base[key] = self.field(key, value, f"dream.{key}", spec)
            where[key] = f"dream.{key}"
        axes: list[tuple[str, tuple[Any, ...]]] = []
        for name, values in self.section(data, "grid", GRID_KEYS).items():
            if name in where:
                raise self.fail(f"grid.{name}", f"set in both grid and {where[name]}; give one")
            if not isinstance(values, list) or not values:
                self.expected(f"grid.{name}", "a non-empty list of values", values)
            normal: list[Any] = []
            for index, value in enumerate(values):
                normal.append(self.field(name, value, f"grid.{name}[{index}]", spec))
                if normal[-1] in normal[:-1]:
                    raise self.fail(f"grid.{name}[{index}]", f"{_show(value)} is listed twice")
            axes.append((name, tuple(normal)))
        count = math.prod(len(values) for _, values in axes)
        if count > MAX_VARIANTS:
            shape = " x ".join(str(len(values)) for _, values in axes)
            raise self.fail("grid", f"{count} variants ({shape}); at most {MAX_VARIANTS}")
        variants = tuple(self.variant(base, where, axes, indices, spec) for indices in
                         itertools.product(*(range(len(values)) for _, values in axes)))

        job: dict[str, Any] = {}
        for key, value in self.section(data, "job", JOB_KEYS).items():
            value = job[key] = self.typed(value, _JOB_TYPES[key], f"job.{key}")
            if value is not None and not _JOB_MINIMUM[key] <= value < math.inf:
                raise self.fail(f"job.{key}", f"must be at least {_JOB_MINIMUM[key]}, got {value}")
        return JobConfig(source=self.source, inputs=inputs, output=Path(output), model=model,
                         weights=weights, variants=variants, grid=tuple(axes),
                         job=JobSettings(**job), max_pixels=max_pixels)


def load_config(path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None
                ) -> JobConfig:
    """Reads, checks and resolves a YAML job config; raises ConfigError for anything wrong.

    ``overrides`` maps top-level, dream or job key names (``output``, ``steps``, ``workers``)
    to values from the command line, which replace the file's before any check; None values
    (options not given) are skipped.
    """
    source = os.fspath(path)
    data = dict(_read_yaml(source))
    for key, value in (overrides or {}).items():
        if key not in _OVERRIDE_KEYS:
            raise ConfigError(f"{source}: override {key!r}: unknown setting; "
                              f"{_suggest(key, _OVERRIDE_KEYS)}")
        section = "dream" if key in DREAM_KEYS else "job" if key in JOB_KEYS else ""
        if value is None:
            continue  # an option that was not given
        if not section:
            data[key] = value
        elif isinstance(data.get(section) or {}, dict):  # a broken section reports itself
            data[section] = {**(data.get(section) or {}), key: value}
    return _Reader(source).build(data)


def image_files(folder: str) -> list[str]:
    """The image files directly inside ``folder`` (by extension), sorted by name."""
    return [os.path.join(folder, child.name) for child in sorted(Path(folder).iterdir())
            if child.suffix.lower() in IMAGE_EXTENSIONS and child.is_file()]


def _what_it_is(entry: str) -> str:
    """Why an entry that is neither a folder, a file nor a glob cannot be used."""
    try:
        mode = os.stat(entry).st_mode
    except OSError:
        return "no such file or folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO), not an image or a list"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device, not an image or a list"
    if stat.S_ISSOCK(mode):
        return "a socket, not an image or a list"
    return "not a regular file, an image or a list"


def _expand_entry(entry: Any, where: str, outdir: Path | None) -> list[str]:
    if not isinstance(entry, str) or not entry or "\0" in entry:
        raise ConfigError(f"{where}: expected a path, got {_show(entry)}")
    path = Path(entry)
    try:
        if path.is_dir():
            found = _without_outputs(image_files(entry), outdir)
            empty = "holds no image file"
        elif path.is_file() and path.suffix.lower() == ".txt":
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            found = [os.path.join(os.path.dirname(entry), line) for line in lines
                     if line and not line.startswith("#")]
            if any("\0" in listed for listed in found):
                raise ConfigError(f"{where}: the list {entry!r} holds a NUL character")
            empty = "lists no file"
        elif path.is_file():
            return [entry]
        elif any(char in entry for char in "*?["):
            found = _without_outputs(
                [p for p in sorted(glob.glob(entry, recursive=True)) if os.path.isfile(p)
                 and os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS], outdir)
            empty = "matches no image file"
        else:
            raise ConfigError(f"{where}: {entry!r}: {_what_it_is(entry)}")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"{where}: cannot read {entry!r}: {reason}") from None
    if not found:
        raise ConfigError(f"{where}: {entry!r} {empty}")
    return found


def _without_outputs(found: list[str], outdir: Path | None) -> list[str]:
    if outdir is None:
        return found
    from jaxdream.outdir import leave_out_outputs

    return leave_out_outputs(found, outdir)


def expand_inputs(entries: Sequence[str], *, source: str = "inputs",
                  outdir: Path | None = None) -> list[str]:
    """The image paths that config input entries name, deduplicated in first-seen order.

    An entry is a file; a folder (its image files by extension, sorted, not recursive); a glob
    (``photos/**/*.jpg``: the image files it matches, sorted); or a ``.txt`` list of paths, one
    per line (blank lines and ``#`` comments skipped, relative paths from the list's folder).
    An entry that matches nothing is a ConfigError naming ``source[index]``; pass
    ``source=f"{config.source}: inputs"``. Images are not opened, and the lines of a list are
    not checked: the renderer reports a missing or bad image on its own, as it goes. With
    ``outdir``, folders and globs leave out that job's own outputs (see
    :func:`jaxdream.outdir.leave_out_outputs`); a file named on its own is always kept.
    """
    found: dict[str, str] = {}  # normalised path -> first spelling seen (dicts keep order)
    for index, entry in enumerate(entries):
        for path in _expand_entry(entry, f"{source}[{index}]", outdir):
            found.setdefault(os.path.normpath(path), path)
    return list(found.values())
