"""Job configs: one strict YAML schema for single dreams, parameter grids and cluster jobs.

A config names inputs, an output folder, the model, the dream's settings (``dream:``), an
optional ``grid:`` of settings to vary (their cartesian product in file order; first axis =
rows of a contact sheet) and an optional ``job:`` for ``jaxdream run``; ``configs/`` holds
examples. Configs are untrusted: read by :mod:`jaxdream.yamlfile` (safe loader only, capped
in size and in what their aliases expand to, duplicate keys refused), every key and value
checked, every grid variant validated before any work starts. Errors are one-line ConfigErrors naming the file, the key path (``dream.steps``,
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
import itertools
import math
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from jaxdream.config_motion import MotionJob, read_motion
from jaxdream.errors import ConfigError, first_few
from jaxdream.images import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS
from jaxdream.models import DEFAULT_MODEL, MODELS, ModelSpec
from jaxdream.recipe import PRESETS, Recipe, format_layers, parse_layers
from jaxdream.storage import is_url
from jaxdream.yamlfile import read_yaml
from jaxdream.yamlfile import show as _show

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
    inputs: tuple[str, ...]  #: entries as written; see :func:`jaxdream.inputs.expand_inputs`
    output: Path
    model: str
    weights: str | None
    variants: tuple[Variant, ...]  #: row-major in grid-axis order; one without a grid
    grid: tuple[tuple[str, tuple[Any, ...]], ...]  #: (axis, normalised values) in file order
    job: JobSettings
    #: Images declaring more pixels than this are refused before decoding (bombs).
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: Input files larger than this many bytes are refused before they are read.
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    #: SHA-256 of the weights a ``--recipe`` PNG was rendered with (None without one, or when
    #: the model differs from the PNG's); rendering with other weights is refused.
    recipe_weights_sha256: str | None = None
    recipe: str | None = None  #: the recipe PNG the settings start from, if any
    #: True for inputs named on the command line: an entry that yields no image is one failed
    #: input among the others; in a config file it is an error before any work starts.
    lenient_inputs: bool = False
    #: An ``animate:`` or ``video:`` job (:mod:`jaxdream.config_motion`); None for stills.
    motion: MotionJob | None = None
    #: The output as written when it is an object-store prefix (``s3://bucket/out``, no
    #: trailing slash); ``output`` then only names outputs relative to it. "" for a folder.
    output_url: str = ""
    #: The column of Parquet inputs that holds image bytes or paths (``image_column``); None:
    #: found by name (``image.bytes`` as Hugging Face datasets write it, ``path``, ...).
    image_column: str | None = None
    #: ``output_shards: N``: outputs are written as WebDataset tar shards of at most N images
    #: each (:mod:`jaxdream.jobs.tarout`), one shard per unit of work; None: loose PNG files.
    output_shards: int | None = None


_RECIPE_TYPES = typing.get_type_hints(Recipe)
_JOB_TYPES = typing.get_type_hints(JobSettings)
_JOB_MINIMUM = {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0, "batch_size": 1,
                "unit_size": 1, "retries": 0}
_SECTIONS = ("dream", "grid", "job", "animate", "video")
_VALUE_KEYS = ("inputs", "output", "model", "weights", "max_side", "max_pixels",
               "max_file_bytes", "image_column", "output_shards")
#: The most images one output shard may hold (a shard is built in a worker's memory).
MAX_SHARD_IMAGES = 100_000
TOP_KEYS = (*_VALUE_KEYS, *_SECTIONS)
_FIELDS = tuple(field.name for field in dataclasses.fields(Recipe))
DREAM_KEYS = tuple(name for name in _FIELDS if name not in ("model", "max_side"))
GRID_KEYS = tuple(name for name in _FIELDS if name not in ("model", "preset"))
JOB_KEYS = tuple(f.name for f in dataclasses.fields(JobSettings))
_OVERRIDE_KEYS = (*_VALUE_KEYS, *DREAM_KEYS, *JOB_KEYS)
#: Keys of a recipe JSON (in a PNG) that say where it came from rather than what it dreams.
_META_KEYS = frozenset({"jaxdream", "weights_sha256", "weights", "input", "id", "grid",
                        "frame", "motion"})
_MISPLACED = {
    "dream.model": "set the model at the top level, not under dream",
    "dream.max_side": "set max_side at the top level, not under dream",
    "grid.model": "cannot be a grid axis: a job runs one model (its weights load once)",
    "grid.preset": "cannot be a grid axis: the preset gives the base values; vary the fields",
}



def _suggest(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"


def _read_yaml(source: str) -> dict[Any, Any]:
    data = read_yaml(source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys "
                          f"({', '.join(TOP_KEYS)}), got {type(data).__name__}")
    return data


class _Reader:
    """Checks one parsed config; every error names where the value came from.

    This is the one place settings are resolved: the recipe's defaults, then the preset, then
    a recipe PNG (keys ``recipe.*``), then the config's values, then command-line options.
    ``label`` names a key path in messages (``job.yaml: dream.steps``, or ``--steps`` for an
    option); ``recipe.*`` paths are named after the PNG.
    """

    def __init__(self, source: str, label: Callable[[str], str] | None = None,
                 recipe_path: str | None = None) -> None:
        self.source = source
        self.label = label or (lambda path: f"{source}: {path}")
        self.recipe_path = recipe_path
        self.recipe_source = f"recipe {recipe_path}"
        self.canonical: dict[str, str] = {}  # layers text as given -> canonical text
        self.pairs: dict[str, tuple[tuple[str, float], ...]] = {}  # canonical text -> layers

    def fail(self, path: str, reason: str) -> ConfigError:
        where = (f"{self.recipe_source}: {path.removeprefix('recipe.')}"
                 if path.startswith("recipe.") else self.label(path))
        return ConfigError(" ".join(f"{where}: {reason}".splitlines()))

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
                if math.isinf(weights[name]):  # JSON's and YAML's 1e400 read as infinity
                    raise self.fail(f"{path}.{name}", "weight is too large (it overflows to "
                                                      "infinity); give a finite number")
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
            recipe.validate("recipe")
        except ConfigError as error:
            key, _, reason = str(error).removeprefix("recipe: ").partition(": ")
            if point and key not in point:  # the fault lies in a combination: name it
                reason += f" (grid point {', '.join(f'{k}={_show(v)}' for k, v in point.items())})"
            raise self.fail(where.get(key, f"dream.{key}"), reason) from None
        return Variant(recipe, point)

    def recipe_values(self, recipe: Mapping[str, Any] | None, spec: ModelSpec,
                      same_model: bool) -> dict[str, Any]:
        """The settings of a recipe PNG's JSON, checked like a config's (``recipe.*``)."""
        if recipe is None:
            return {}
        unknown = sorted(set(recipe) - set(_FIELDS) - _META_KEYS)
        if unknown:
            raise ConfigError(f"{self.recipe_source}: {len(unknown)} unknown recipe key(s): "
                              f"{first_few(list(unknown))}")
        return {key: self.field(key, recipe[key], f"recipe.{key}", spec) for key in _FIELDS
                # Under another model the PNG's layers mean nothing: that model's default.
                if key in recipe and key != "model" and (key != "layers" or same_model)}

    def recipe_model(self, recipe: Mapping[str, Any] | None) -> str | None:
        if recipe is None:
            return None
        if not isinstance(recipe, Mapping):
            raise ConfigError(f"{self.recipe_source}: recipe is not a JSON object")
        model = recipe.get("model", DEFAULT_MODEL)
        if not isinstance(model, str):
            raise self.fail("recipe.model", f"expected a name, got {_show(model)}")
        return model

    def settings(self, data: dict[Any, Any], spec: ModelSpec
                 ) -> tuple[dict[str, Any], dict[str, str]]:
        """The config's recipe values (``max_side`` and ``dream``) and the key path of each."""
        values: dict[str, Any] = {}
        where: dict[str, str] = {}  # recipe field -> the key path that set it
        if "max_side" in data:
            values["max_side"] = self.field("max_side", data["max_side"], "max_side", spec)
            where["max_side"] = "max_side"
        for key, value in self.section(data, "dream", DREAM_KEYS).items():
            values[key] = self.field(key, value, f"dream.{key}", spec)
            where[key] = f"dream.{key}"
        return values, where

    def grid(self, data: dict[Any, Any], where: dict[str, str], spec: ModelSpec
             ) -> list[tuple[str, tuple[Any, ...]]]:
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
        return axes

    def job(self, data: dict[Any, Any]) -> JobSettings:
        job: dict[str, Any] = {}
        for key, value in self.section(data, "job", JOB_KEYS).items():
            value = job[key] = self.typed(value, _JOB_TYPES[key], f"job.{key}")
            if value is not None and not _JOB_MINIMUM[key] <= value < math.inf:
                raise self.fail(f"job.{key}", f"must be at least {_JOB_MINIMUM[key]}, got {value}")
        return JobSettings(**job)

    def outputs(self, data: dict[Any, Any], job: JobSettings, motion: MotionJob | None
                ) -> tuple[str | None, int | None, JobSettings]:
        """``image_column``, ``output_shards``, and the job settings they imply (with shards,
        one unit of work is one shard: ``unit_size`` is ``output_shards``)."""
        column = data.get("image_column")
        if column is not None:
            column = self.typed(column, str, "image_column")
            if not column.strip() or "\0" in column:
                self.expected("image_column", "a column name", column)
        shards = data.get("output_shards")
        if shards is None:
            return column, None, job
        shards = self.typed(shards, int, "output_shards")
        if not 1 <= shards <= MAX_SHARD_IMAGES:
            raise self.fail("output_shards", f"must be 1 to {MAX_SHARD_IMAGES} images per "
                                             f"shard, got {shards}")
        if motion is not None:
            raise self.fail("output_shards", "applies to still images; an animate: or video: "
                                             "job writes clips")
        given = (data.get("job") or {}).get("unit_size")
        if given is not None and given != shards:
            raise self.fail("job.unit_size", f"is {given} but output_shards is {shards}; each "
                                             f"unit of work is one shard: give one of them")
        return column, shards, dataclasses.replace(job, unit_size=shards)

    def build(self, data: dict[Any, Any], recipe: Mapping[str, Any] | None = None) -> JobConfig:
        """The checked config; ``recipe`` (a recipe PNG's JSON) sits under its settings."""
        self.section(data, "", TOP_KEYS)
        for key in ("inputs", "output"):
            if data.get(key) is None:
                raise self.fail(key, "missing; every config names its inputs and output folder")
        entries = [data["inputs"]] if isinstance(data["inputs"], str) else data["inputs"]
        if not isinstance(entries, (list, tuple)) or not entries:
            self.expected("inputs", "a path or a non-empty list of paths", data["inputs"])
        inputs = tuple(self.path_text(e, f"inputs[{i}]") for i, e in enumerate(entries))
        output = self.path_text(data["output"], "output")
        recipe_model = self.recipe_model(recipe)
        model = self.typed(data.get("model", recipe_model or DEFAULT_MODEL), str, "model")
        if model not in MODELS:
            raise self.fail("model", f"unknown model {model!r}; {_suggest(model, list(MODELS))}")
        spec = MODELS[model]
        weights = data.get("weights")
        weights = None if weights is None else self.path_text(weights, "weights")
        max_pixels = self.typed(data.get("max_pixels", DEFAULT_MAX_PIXELS), int, "max_pixels")
        if max_pixels < 16 * 16:
            raise self.fail("max_pixels", f"must be at least 256 (16 x 16), got {max_pixels}")
        max_file_bytes = self.typed(data.get("max_file_bytes", DEFAULT_MAX_FILE_BYTES), int,
                                    "max_file_bytes")
        if max_file_bytes < 1024:
            raise self.fail("max_file_bytes", f"must be at least 1024, got {max_file_bytes}")

        from_recipe = self.recipe_values(recipe, spec, same_model=model == recipe_model)
        values, where = self.settings(data, spec)
        if recipe is not None and "preset" in where:
            raise self.fail(where["preset"], "cannot be combined with --recipe, which sets the "
                                             "whole recipe; give one")
        axes = self.grid(data, where, spec)
        origin = {**{key: f"recipe.{key}" for key in from_recipe}, **where}
        variants = tuple(self.variant({**from_recipe, **values}, origin, axes, indices, spec)
                         for indices in itertools.product(*(range(len(v)) for _, v in axes)))
        sha = recipe.get("weights_sha256") if recipe is not None else None
        motion = read_motion(self, data, where, variants)
        column, shards, job = self.outputs(data, self.job(data), motion)
        return JobConfig(source=self.source, inputs=inputs, output=Path(output), model=model,
                         weights=weights, variants=variants, grid=tuple(axes),
                         job=job, max_pixels=max_pixels,
                         max_file_bytes=max_file_bytes,
                         recipe_weights_sha256=sha if isinstance(sha, str)
                         and model == recipe_model else None,
                         recipe=self.recipe_path, motion=motion,
                         output_url=output.rstrip("/") if is_url(output) else "",
                         image_column=column, output_shards=shards)


def load_config(path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None, *,
                recipe: str | None = None) -> JobConfig:
    """Reads, checks and resolves a YAML job config; raises ConfigError for anything wrong.

    ``overrides`` maps top-level, dream or job key names (``output``, ``steps``, ``workers``)
    to values from the command line, which replace the file's before any check and are named
    as options (``--steps``) in messages; None values (options not given) are skipped.
    ``recipe`` is a PNG that jaxdream wrote: its settings sit under the config's.
    """
    source = os.fspath(path)
    data = dict(_read_yaml(source))
    given: dict[str, str] = {}  # key path -> the option that set it
    for key, value in (overrides or {}).items():
        if key not in _OVERRIDE_KEYS:
            raise ConfigError(f"{source}: override {key!r}: unknown setting; "
                              f"{_suggest(key, _OVERRIDE_KEYS)}")
        section = "dream" if key in DREAM_KEYS else "job" if key in JOB_KEYS else ""
        if value is None:
            continue  # an option that was not given
        given[f"{section}.{key}" if section else key] = f"--{key.replace('_', '-')}"
        if not section:
            data[key] = value
        elif isinstance(data.get(section) or {}, dict):  # a broken section reports itself
            data[section] = {**(data.get(section) or {}), key: value}
    reader = _Reader(source, lambda path: given.get(path) or f"{source}: {path}", recipe)
    return reader.build(data, _recipe_json(recipe))


def options_config(inputs: Sequence[str], output: str, settings: Mapping[str, Any], *,
                   recipe: str | None = None) -> JobConfig:
    """The job ``jaxdream dream INPUT... -o OUTDIR [options]`` runs: checked and resolved as a
    config file is, with messages that name the options (``--steps``, ``INPUT``).

    ``settings`` maps top-level or dream key names (``model``, ``steps``, ``layers``) to
    option values; None values are skipped. An input that yields no image is one failed input
    (``lenient_inputs``), as a missing file is.
    """
    data: dict[str, Any] = {"inputs": list(inputs), "output": output, "dream": {}}
    for key, value in settings.items():
        if value is not None:
            (data if key in _VALUE_KEYS else data["dream"])[key] = value
    reader = _Reader("options", _option_name, recipe)
    config = reader.build(data, _recipe_json(recipe))
    return dataclasses.replace(config, lenient_inputs=True)


def _option_name(path: str) -> str:
    """The command-line option a key path comes from: ``dream.step_size`` -> ``--step-size``."""
    if path.startswith("inputs"):
        return "INPUT"
    name = path.removeprefix("dream.").partition("[")[0].partition(".")[0]
    return f"--{name.replace('_', '-')}"


def _recipe_json(path: str | None) -> Mapping[str, Any] | None:
    from jaxdream.images import read_recipe

    return None if path is None else read_recipe(path)


def recipe_from_json(data: Any, source: str) -> tuple[Recipe, str | None]:
    """A recipe JSON that jaxdream wrote (a PNG's, an animation's), checked and resolved as a
    config's settings are; returns it and the SHA-256 of its weights."""
    reader = _Reader(source)
    reader.recipe_source = source
    model = reader.recipe_model(data) or DEFAULT_MODEL
    if model not in MODELS:
        raise ConfigError(f"{source}: model: unknown model {model!r}; "
                          f"{_suggest(model, list(MODELS))}")
    spec = MODELS[model]
    values = reader.recipe_values(data, spec, same_model=True)
    recipe = reader.variant(values, {key: f"recipe.{key}" for key in values}, [], (),
                            spec).recipe
    sha = data.get("weights_sha256")
    return recipe, sha if isinstance(sha, str) else None


def recipe_from_settings(model: str, settings: Mapping[str, Any], source: str = "settings"
                         ) -> Recipe:
    """A recipe from keyword settings (the Python API), resolved and checked as a config's
    ``dream:`` section is: defaults, then the preset, then the settings. Messages name the
    setting (``settings: steps: must be ...``)."""
    values = dict(settings)
    data: dict[str, Any] = {"dream": values}
    if "max_side" in values:
        data["max_side"] = values.pop("max_side")
    reader = _Reader(source, lambda path: f"{source}: {path.removeprefix('dream.')}")
    if model not in MODELS:
        raise ConfigError(f"{source}: model: unknown model {model!r}; "
                          f"{_suggest(model, list(MODELS))}")
    spec = MODELS[model]
    resolved, where = reader.settings(data, spec)
    return reader.variant(resolved, where, [], (), spec).recipe
