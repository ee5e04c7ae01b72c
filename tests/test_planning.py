"""Streaming planning (issue 13): units go out while the inputs are still being listed, item
ids come from what identifies an input without reading it, and the names of listed inputs do
not depend on the other inputs. No Ray here: the scheduler is driven by hand."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from jaxdream import jobs
from jaxdream.config import JobSettings, load_config
from jaxdream.errors import JaxdreamError
from jaxdream.jobs.manifest import finished_keys, item_key, make_row
from jaxdream.jobs.run import Intake
from jaxdream.planning import output_stem, plan, plan_items, plan_stream
from jaxdream.recipe import Recipe
from jaxdream.render import Outcome, WorkItem, _load

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ray_cluster import write_config  # noqa: E402

RECIPE = Recipe(layers=(("block0", 1.0),), steps=1, octaves=1, max_side=64)


def _photo(path: Path, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _item(index: int, outdir: Path) -> WorkItem:
    return WorkItem(id=f"id-{index}", input=f"in/p{index:06d}.png",
                    output=outdir / f"p{index:06d}_dream.png", recipe=RECIPE, point={})


class _Handle:
    """A worker actor's handle that only records what it was sent."""

    def __init__(self) -> None:
        self.sent: list[list[WorkItem]] = []
        self.render = self

    def remote(self, items: list[WorkItem]) -> object:
        self.sent.append(items)
        return object()


def test_the_first_unit_is_dispatched_before_the_listing_ends(tmp_path: Path) -> None:
    """A plan that keeps coming (a slow bucket listing): the scheduler sends units from what
    it has and asks the plan for more only as its queue runs short."""
    state = {"listed": 0, "ended": False}
    total = 5 * jobs.INTAKE

    def slow_listing() -> Iterator[WorkItem]:
        for index in range(total):
            state["listed"] += 1
            yield _item(index, tmp_path)
        state["ended"] = True

    config: Any = dataclasses.make_dataclass("C", ["job", "output"])(
        JobSettings(unit_size=4), tmp_path)
    writer = jobs.ManifestWriter(tmp_path / jobs.MANIFEST_NAME, tmp_path)
    driver = jobs.Scheduler(config, slow_listing(), writer, jobs.JobSummary(), say=print,
                            progress=False, on_rows=None, worker_wait_s=1)
    handle = _Handle()
    driver.pool.workers = [jobs.Worker(handle=handle, state="ready")]
    driver._top_up()
    driver._dispatch()
    writer.close()
    assert len(handle.sent) == jobs.UNITS_PER_WORKER and len(handle.sent[0]) == 4
    assert not state["ended"] and state["listed"] <= jobs.INTAKE + 1
    assert not driver.exhausted
    # Emptying the queue makes it take the rest, a chunk at a time, until the plan ends.
    taken = []
    while not driver.exhausted:
        taken += [item for unit in driver.queue for item in unit.items]
        driver.queue.clear()
        driver._top_up()
    taken += [item for unit in driver.queue for item in unit.items]
    sent = [item for unit in handle.sent for item in unit]
    assert state["ended"] and len(taken) + len(sent) == total
    assert len({item.id for item in taken + sent}) == total


def test_plan_stream_yields_items_while_the_listing_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Listed inputs (objects, shard members) become items one by one, as they are listed."""
    import jaxdream.inputs

    state = {"ended": False}

    def listing(entries: Any, **_: Any) -> Iterator[tuple[str, str, str]]:
        for index in range(1000):
            url = f"s3://photos/in/p{index:04d}.jpg"
            yield url, json.dumps({"url": url, "etag": f"e{index}", "size": 10}), ""
        state["ended"] = True

    monkeypatch.setattr(jaxdream.inputs, "iter_inputs", listing)
    config = load_config(write_config(tmp_path / "job.yaml", ["s3://photos/in/"],
                                      tmp_path / "out"))
    stream = plan_stream(config)
    first = next(stream)
    assert isinstance(first, WorkItem) and first.input == "s3://photos/in/p0000.jpg"
    assert not state["ended"]
    assert len(list(stream)) == 999 and state["ended"]


def test_a_local_id_comes_from_path_size_and_mtime_not_from_the_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    photo = _photo(tmp_path / "cat.png")
    config = load_config(write_config(tmp_path / "job.yaml", [str(photo)], tmp_path / "out"))

    import builtins

    real_open = builtins.open
    opened: list[str] = []

    def spying_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spying_open)
    (item,), failures = plan_items(config)
    monkeypatch.undo()
    assert not failures and str(photo) not in opened  # planning never opened the photo
    assert item.input_sha256 == "" and item.input_size == photo.stat().st_size
    assert item.output == tmp_path / "out" / "cat_dream.png"  # local names as before

    data = photo.read_bytes()  # reading the file changes nothing
    (again,), _ = plan_items(config)
    assert again.id == item.id

    # The worker reads the file once, and its hash is what the row and the PNG record.
    _, digest = _load(item)
    assert digest == hashlib.sha256(data).hexdigest()

    # New content (size and modification time change): a new id, and the old item refuses.
    _photo(photo, seed=1)
    os.utime(photo, ns=(item.input_mtime_ns + 10**9, item.input_mtime_ns + 10**9))
    (changed,), _ = plan_items(config)
    assert changed.id != item.id and changed.output == item.output
    with pytest.raises(JaxdreamError, match="changed since the job was planned"):
        _load(item)
    # Only the modification time (a file rewritten with the same bytes): a new id as well.
    os.utime(photo, ns=(changed.input_mtime_ns + 10**9, changed.input_mtime_ns + 10**9))
    (touched,), _ = plan_items(config)
    assert touched.id not in (item.id, changed.id)


def test_an_entry_that_matches_nothing_is_refused_before_the_first_item(
        tmp_path: Path) -> None:
    """Streaming must not turn a typo in the last input entry into a job stopped halfway:
    every entry is opened before the first item comes out."""
    from jaxdream.errors import ConfigError
    from jaxdream.inputs import iter_inputs

    folder = tmp_path / "photos"
    folder.mkdir()
    _photo(folder / "a.png")
    _photo(folder / "b.png", 1)
    config = load_config(write_config(tmp_path / "job.yaml",
                                      [str(folder), str(tmp_path / "typo" / "*.png")],
                                      tmp_path / "out"))
    stream = plan_stream(config)
    with pytest.raises(ConfigError, match=r"inputs\[1\]"):
        next(stream)
    # Lenient (INPUTs on the command line): the bad entry is one failure, in its place.
    typo = str(tmp_path / "typo" / "*.png")
    found = list(iter_inputs([typo, str(folder)], lenient=True))
    assert [(path, bool(why)) for path, _, why in found] == [
        (typo, True), (str(folder / "a.png"), False),
        (str(folder / "b.png"), False)]


def test_an_unplannable_local_input_fails_alone_with_its_reason(tmp_path: Path) -> None:
    good = _photo(tmp_path / "good.png")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    items, failures = plan([str(good), str(fifo), str(tmp_path / "missing.png")],
                           tmp_path / "out", [(RECIPE, {})])
    assert [item.input for item in items] == [str(good)]
    reasons = {outcome.input: outcome.reason for outcome in failures}
    assert "pipe" in reasons[str(fifo)].lower() or "fifo" in reasons[str(fifo)].lower()
    assert "no such file" in reasons[str(tmp_path / "missing.png")]


def _listed(url: str, etag: str = "e") -> tuple[str, str]:
    return url, json.dumps({"url": url, "etag": etag, "size": 10, "mtime": ""})


def test_listed_inputs_are_named_by_themselves_alone(tmp_path: Path) -> None:
    """Deterministic, unique by construction, independent of order and of the other inputs."""
    out = tmp_path / "out"
    cat = _listed("s3://photos/a/cat.jpg")
    others = [_listed("s3://photos/b/cat.jpg"), _listed("s3://photos/a/cat.png"),
              _listed("s3://photos/a/dog.jpg"), _listed("gs://photos/a/cat.jpg")]
    alone, _ = plan([cat], out, [(RECIPE, {})])
    together, _ = plan([*reversed(others), cat], out, [(RECIPE, {})])
    named = {item.input: item.output for item in together}
    assert named[cat[0]] == alone[0].output
    assert alone[0].output.name == f"{output_stem(cat[0], True)}_dream.png"
    assert alone[0].output.name.startswith("cat_")
    assert len(set(named.values())) == len(named) == 5
    # A presigned URL's signature is neither in the name nor does it change it.
    signed, _ = plan([_listed("s3://photos/a/cat.jpg?X-Amz-Signature=secret")], out,
                     [(RECIPE, {})])
    assert signed[0].output == alone[0].output
    # A new ETag (the object changed) is a new id under the same name.
    changed, _ = plan([_listed(cat[0], etag="f")], out, [(RECIPE, {})])
    assert changed[0].output == alone[0].output and changed[0].id != alone[0].id


def test_resume_skips_exactly_what_is_done_and_renders_a_changed_file(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(4):
        _photo(photos / f"p{index}.png", seed=index)
    out = tmp_path / "out"
    out.mkdir()
    config = load_config(write_config(tmp_path / "job.yaml", [str(photos)], out))
    items, _ = plan_items(config)
    with open(out / jobs.MANIFEST_NAME, "w", encoding="utf-8") as manifest:
        for item in items:  # a first run finished everything
            item.output.write_bytes(b"png")
            outcome = Outcome(item.input, item.output, "done", "", item.id)
            manifest.write(json.dumps(make_row(item, outcome, item.id, out)) + "\n")
    _photo(photos / "p2.png", seed=7)  # then one photo is edited
    os.utime(photos / "p2.png", ns=(1, 10**18))
    (out / items[3].output.name).unlink()  # and one output is lost

    finished = finished_keys(out / jobs.MANIFEST_NAME, out)
    assert finished == {item_key(item, out) for item in items[:3]}
    writer = jobs.ManifestWriter(out / jobs.MANIFEST_NAME, out)
    summary = jobs.JobSummary()
    lines: list[str] = []
    todo = list(Intake(plan_stream(config), finished, writer, summary, out, say=lines.append,
                       resume=True))
    writer.close()
    assert [item.input for item in todo] == [str(photos / "p2.png"), str(photos / "p3.png")]
    assert (summary.planned, summary.already_done) == (4, 2)
    assert lines == ["resuming: 2 of 4 item(s) already done"]
