"""Compiled dream programs on disk: a warm run loads them instead of tracing, a damaged file
costs a compile and nothing else, and a program is never reused for other settings."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jaxdream import engine as engine_module
from jaxdream import program_cache, tiles
from jaxdream.ascent import StaticSettings
from jaxdream.engine import Engine, ItemParams
from jaxdream.models import LoadedModel

from conftest import ROOT


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Path]:
    previous = program_cache._directory
    program_cache.set_directory(tmp_path)
    engine_module._PROGRAMS.clear()  # a fresh process: nothing compiled in memory
    try:
        yield tmp_path
    finally:
        program_cache.set_directory(previous)
        engine_module._PROGRAMS.clear()


def _photo() -> np.ndarray:
    return np.random.default_rng(3).uniform(0, 255, (37, 45, 3)).astype(np.float32)


SETTINGS = StaticSettings(("block2",), octaves=2, steps=2)
PARAMS = ItemParams(1.0, 3, 7, (1.0,))


def test_a_new_process_loads_the_program_without_tracing(
        tiny_model: LoadedModel, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = Engine(tiny_model, SETTINGS)
    expected = first.render([_photo()], [PARAMS])[0]
    assert (first.stats.programs, first.stats.loaded) == (1, 0)
    assert len(list(store.glob("*.xla"))) == 1

    engine_module._PROGRAMS.clear()

    def no_tracing(*args: object) -> None:
        raise AssertionError("the stored program was traced again")

    monkeypatch.setattr(engine_module, "_jitted", no_tracing)
    second = Engine(tiny_model, SETTINGS)
    np.testing.assert_array_equal(second.render([_photo()], [PARAMS])[0], expected)
    assert (second.stats.programs, second.stats.loaded, second.stats.compiled) == (1, 1, 0)


def test_a_damaged_program_file_is_compiled_again(tiny_model: LoadedModel, store: Path) -> None:
    expected = Engine(tiny_model, SETTINGS).render([_photo()], [PARAMS])[0]
    (path,) = store.glob("*.xla")
    path.write_bytes(b"not a program")
    engine_module._PROGRAMS.clear()
    engine = Engine(tiny_model, SETTINGS)
    np.testing.assert_array_equal(engine.render([_photo()], [PARAMS])[0], expected)
    assert engine.stats.loaded == 0
    assert path.stat().st_size > 1000  # replaced by a real program


def test_other_settings_or_sizes_never_reuse_a_program(tiny_model: LoadedModel,
                                                       store: Path) -> None:
    Engine(tiny_model, SETTINGS).render([_photo()], [PARAMS])
    Engine(tiny_model, StaticSettings(("block2",), octaves=2, steps=3)).render([_photo()],
                                                                               [PARAMS])
    big = np.zeros((70, 45, 3), np.float32)
    Engine(tiny_model, SETTINGS).render([big], [PARAMS])
    assert len(list(store.glob("*.xla"))) == 3


def test_only_the_most_recently_used_programs_are_kept(
        tiny_model: LoadedModel, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(program_cache, "MAX_STORED", 2)
    for steps in (1, 2, 3):
        Engine(tiny_model, StaticSettings(("block2",), octaves=1, steps=steps)).render(
            [_photo()], [PARAMS])
    assert len(list(store.glob("*.xla"))) == 2


def test_cpu_programs_compile_with_the_measured_options_or_without_unknown_ones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import jax
    import jax.numpy as jnp

    lowered = jax.jit(lambda x: jnp.sin(x) * 2.0).lower(jnp.ones(4))
    seen: list[Any] = []
    real = type(lowered).compile

    def spy(self: Any, compiler_options: Any = None) -> Any:
        seen.append(compiler_options)
        return real(self, compiler_options=compiler_options)

    monkeypatch.setattr(type(lowered), "compile", spy)
    monkeypatch.setattr(program_cache, "_options_known", True)
    compiled = program_cache.compile_lowered(lowered)
    assert seen == [program_cache.CPU_COMPILE_OPTIONS]
    np.testing.assert_allclose(compiled(jnp.ones(4)), 2 * np.sin(np.ones(4)), rtol=1e-6)
    # A jaxlib without the option: XLA refuses it by name; the program compiles without it,
    # and later programs do not try again.
    monkeypatch.setattr(program_cache, "CPU_COMPILE_OPTIONS", {"xla_cpu_no_such_option": True})
    seen.clear()
    program_cache.compile_lowered(lowered)
    program_cache.compile_lowered(lowered)
    assert seen == [{"xla_cpu_no_such_option": True}, None, None]
    assert program_cache._options_known is False


def test_build_seconds_are_wall_time_with_overlapping_builds_counted_once() -> None:
    # Builder threads compile at once: the summary's seconds are the time during which any
    # build ran, not the sum of every builder's.
    stats = program_cache.CompileStats(programs=2, spans=[(10.0, 12.0), (11.0, 13.5)])
    other = program_cache.CompileStats(programs=1, compiled=1, spans=[(20.0, 21.0)])
    stats.add(other)
    assert stats.seconds == 4.5 and stats.programs == 3 and stats.compiled == 1
    assert program_cache.CompileStats().seconds == 0.0
    assert "3 program(s) in 4.5 s (1 compiled, 2 from the compilation cache" in stats.describe()


def test_a_jaxlib_without_the_stores_own_key_option_still_compiles(
        store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import jax
    import jax.numpy as jnp

    monkeypatch.setattr(program_cache, "_OWN_KEY", {"xla_no_such_option": False})
    monkeypatch.setattr(program_cache, "_options_known", True)
    f = jax.jit(lambda w, x: jnp.tanh(x @ w) * 2.0)
    w, x = jnp.eye(8), jnp.ones((8, 8))
    program, loaded = program_cache.load_or_compile("k", (w, x), lambda: f.lower(w, x))
    np.testing.assert_allclose(program(w, x), 2 * np.tanh(np.ones((8, 8))), rtol=1e-6)
    # Compiled as JAX would (its cache may serve it), so not stored; the CPU options stay on.
    assert not loaded and not list(store.glob("*.xla"))
    assert program_cache._options_known


UPGRADED = r"""
import sys
from pathlib import Path
import jax, jax.numpy as jnp, numpy as np
from jaxdream import engine, program_cache
engine.enable_compilation_cache(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
f = jax.jit(lambda w, x: jnp.tanh(x @ w).sum(0) * 3.0)
w, x = (jnp.asarray(np.random.default_rng(s).normal(size=(96, 96)), jnp.float32) for s in (1, 2))
hits = program_cache.cache_hits()
program_cache.compile_lowered(f.lower(w, x))  # as an older jaxdream compiled it
if sys.argv[2] == "new":
    entries = {p.name for p in Path(sys.argv[1]).iterdir()}
    program, loaded = program_cache.load_or_compile("new-source", (w, x), lambda: f.lower(w, x))
    # Nothing new in JAX's cache: a later store miss could never be served a program there.
    assert {p.name for p in Path(sys.argv[1]).iterdir()} - entries <= {"jaxdream-programs"}
    stored = len(list((program_cache._directory).glob("*.xla")))
    again, loaded_again = program_cache.load_or_compile("new-source", (w, x), lambda: 1 / 0)
    print(program_cache.cache_hits() - hits, loaded, stored, loaded_again,
          bool(np.array_equal(again(w, x), f(w, x))))
"""


def test_a_program_in_jaxs_cache_is_still_stored_and_runs_from_its_file(
        tmp_path: Path) -> None:
    # After an upgrade that left a program's HLO as it was, JAX's compilation cache still
    # holds it, and an executable served from there fails when run from a file ("function ...
    # not found"): the store compiles its own, which a warm run then loads untraced and runs.
    def run(phase: str) -> list[str]:
        done = subprocess.run([sys.executable, "-c", UPGRADED, str(tmp_path), phase],
                              capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.split()

    run("old")
    # One hit (the older build's compile, served by JAX's cache), a program stored anyway,
    # loaded back from its file, and the same numbers from it.
    assert run("new") == ["1", "False", "1", "True", "True"]


# ------------------------------------------------------------------- building ahead in threads
def _sizes() -> list[np.ndarray]:
    """Photos of three shape buckets, the first bucket twice (bucket 64: 64x64, 128x64,
    64x128)."""
    rng = np.random.default_rng(5)
    return [rng.uniform(0, 255, shape).astype(np.float32)
            for shape in ((40, 50, 3), (90, 45, 3), (37, 45, 3), (50, 100, 3))]


def test_programs_built_ahead_in_threads_dream_the_same_pixels_and_are_built_once(
        tiny_model: LoadedModel, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = _sizes()
    params = [PARAMS] * len(images)
    alone = Engine(tiny_model, SETTINGS, compile_ahead=0)
    expected = alone.render(images, params)
    assert alone.stats.programs == 3
    # Another process: nothing in memory or on disk; two builders take buckets 2 and 3.
    engine_module._PROGRAMS.clear()
    for path in store.glob("*.xla"):
        path.unlink()
    builders: set[str] = set()
    real_build = Engine._build

    def spy(self: Engine, *args: Any) -> Any:
        builders.add(threading.current_thread().name)
        return real_build(self, *args)

    monkeypatch.setattr(Engine, "_build", spy)
    ahead = Engine(tiny_model, SETTINGS, compile_ahead=2)
    got = ahead.render(images, params)
    for out, want in zip(got, expected, strict=True):
        np.testing.assert_array_equal(out, want)
    assert ahead.stats.programs == 3  # each bucket's program built once, by one thread
    assert any(name.startswith("jaxdream-compile") for name in builders), builders
    assert threading.current_thread().name in builders  # the first bucket: the caller's


def test_a_program_that_fails_to_build_ahead_fails_where_it_is_needed(
        tiny_model: LoadedModel, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_build = Engine._build

    def failing(self: Engine, key: Any, images: Any, params: Any) -> Any:
        if tuple(images.shape)[1:3] == (64, 128):
            raise RuntimeError("out of memory building 64x128")
        return real_build(self, key, images, params)

    monkeypatch.setattr(Engine, "_build", failing)
    engine = Engine(tiny_model, SETTINGS, compile_ahead=2)
    done: list[int] = []
    with pytest.raises(RuntimeError, match="64x128"):
        for index, _ in engine.render_iter(_sizes(), [PARAMS] * 4):
            done.append(index)
    assert sorted(done) == [0, 1, 2]  # the buckets before it were dreamed and handed out
    assert not engine_module._BUILDING  # nothing left marked as being built


#: The thread-count variables: (name, the function that reads it).
THREAD_COUNTS = [(engine_module.COMPILE_AHEAD_ENV, engine_module.default_compile_ahead),
                 (tiles.TILE_WORKERS_ENV, tiles.default_tile_workers)]


@pytest.mark.parametrize("name, read", THREAD_COUNTS)
@pytest.mark.parametrize("text, expected", [("0", 0), ("3", 3), (" 2 ", 2), ("", 2)])
def test_thread_counts_come_from_the_environment(name: str, read: Any, text: str, expected: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "process_cores", lambda: 2)  # unset: one per core
    monkeypatch.setenv(name, text)
    assert read() == expected


@pytest.mark.parametrize("name, read", THREAD_COUNTS)
@pytest.mark.parametrize("text", ["two", "-1", "1.5"])
def test_a_bad_thread_count_is_refused_by_name(name: str, read: Any, text: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from jaxdream.errors import ConfigError

    monkeypatch.setenv(name, text)
    with pytest.raises(ConfigError, match=name):
        read()


@pytest.mark.parametrize("name, read", THREAD_COUNTS)
def test_thread_counts_never_change_which_program_a_key_names(
        name: str, read: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(name, raising=False)
    plain = program_cache.program_key("x")
    monkeypatch.setenv(name, "3")
    assert program_cache.program_key("x") == plain

