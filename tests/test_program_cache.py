"""Compiled dream programs on disk: a warm run loads them instead of tracing, a damaged file
costs a compile and nothing else, and a program is never reused for other settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jaxdream import engine as engine_module
from jaxdream import program_cache
from jaxdream.ascent import StaticSettings
from jaxdream.engine import Engine, ItemParams
from jaxdream.models import LoadedModel


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
