"""Dreams image files into an output folder on this machine: what ``jaxdream dream`` runs.

Inputs are loaded one by one (a bad file is reported and skipped, never fatal), grouped by
size so that equal sizes share batches and one compiled program, rendered through the engine,
and written atomically as PNGs that carry their recipe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from jaxdream.engine import CompileStats, Engine, default_batch_size, group_by_shape
from jaxdream.errors import JaxdreamError
from jaxdream.images import load_rgb, save_png, to_uint8
from jaxdream.models import LoadedModel
from jaxdream.recipe import Recipe

Status = Literal["done", "failed", "skipped"]

_UNSAFE = re.compile(r"[^\w.\-]+", re.UNICODE)


@dataclasses.dataclass(frozen=True)
class Outcome:
    input: str
    output: Path | None
    status: Status
    reason: str = ""


@dataclasses.dataclass
class Report:
    outcomes: list[Outcome]
    compile_stats: CompileStats
    render_seconds: float


def _safe_stem(path: str) -> str:
    """A file-name stem that cannot escape a folder, hide, or pass for an option."""
    stem = _UNSAFE.sub("_", Path(path).stem).strip("._-")
    return stem[:100] or "image"


def output_paths(inputs: Sequence[str], outdir: Path) -> list[Path]:
    """Deterministic ``OUTDIR/<stem>_dream.png`` names, unique, never equal to an input.

    Inputs whose names would collide (``a/cat.jpg`` and ``b/cat.png``) get a short hash of the
    path as given, so the same command always writes the same names.
    """
    stems = [_safe_stem(path) for path in inputs]
    resolved_inputs = {os.path.realpath(path) for path in inputs}
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    outputs: list[Path] = []
    for path, stem in zip(inputs, stems, strict=True):
        candidate = outdir / f"{stem}_dream.png"
        if counts[stem] > 1 or os.path.realpath(candidate) in resolved_inputs:
            digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:8]
            candidate = outdir / f"{stem}_{digest}_dream.png"
        outputs.append(candidate)
    return outputs


def dream_files(inputs: Sequence[str], outdir: str | os.PathLike[str], recipe: Recipe,
                model: LoadedModel, *, batch_size: int | None = None, overwrite: bool = False,
                progress: bool = True, report: Callable[[str], None] | None = None
                ) -> Report:
    """Dreams every input into ``outdir``; reports one outcome per input, in order."""
    say = report or (lambda line: tqdm.write(line, file=sys.stderr))
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise JaxdreamError(f"output folder {str(out)!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)

    outputs = output_paths(inputs, out)
    outcomes: list[Outcome | None] = [None] * len(inputs)
    images: dict[int, np.ndarray] = {}
    input_sha256: dict[int, str] = {}
    for index, path in enumerate(inputs):
        if outputs[index].exists() and not overwrite:
            outcomes[index] = Outcome(path, outputs[index], "skipped",
                                      "output exists (pass --overwrite to replace it)")
            say(f"skipped {path}: {outputs[index]} exists (pass --overwrite to replace it)")
            continue
        try:
            images[index] = load_rgb(path, max_side=recipe.max_side)
            with open(path, "rb") as handle:
                input_sha256[index] = hashlib.file_digest(handle, "sha256").hexdigest()
        except JaxdreamError as error:
            images.pop(index, None)
            outcomes[index] = Outcome(path, None, "failed", str(error))
            say(f"error: {error}")
        except OSError as error:
            images.pop(index, None)
            outcomes[index] = Outcome(path, None, "failed", f"{path}: {error.strerror or error}")
            say(f"error: {path}: {error.strerror or error}")

    engine = Engine(model, recipe.static_settings(), batch_size=batch_size or default_batch_size())
    params = recipe.item_params()
    groups = group_by_shape([images[i].shape for i in sorted(images)])
    order = sorted(images)
    start = time.perf_counter()
    bar = tqdm(total=len(images), unit="img", disable=not progress, file=sys.stderr,
               desc="dreaming")
    try:
        for shape, members in groups.items():
            indices = [order[m] for m in members]
            bar.set_postfix_str(f"{shape[1]}x{shape[0]}")
            results = engine.render_iter([images[i] for i in indices], [params] * len(indices))
            for slot, result in results:
                index = indices[slot]
                path = inputs[index]
                extra = {"input": {"name": Path(path).name, "sha256": input_sha256[index],
                                   "width": int(result.shape[1]), "height": int(result.shape[0])},
                         "weights": model.weights_path.name}
                try:
                    save_png(outputs[index], to_uint8(result),
                             recipe.to_json(weights_sha256=model.weights_sha256, extra=extra))
                    outcomes[index] = Outcome(path, outputs[index], "done")
                except (JaxdreamError, OSError) as error:
                    outcomes[index] = Outcome(path, None, "failed", str(error))
                    say(f"error: {path}: {error}")
                bar.update(1)
    finally:
        bar.close()
    return Report([outcome for outcome in outcomes if outcome is not None], engine.stats,
                  time.perf_counter() - start)
