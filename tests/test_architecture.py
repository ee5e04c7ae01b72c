"""The promises of the layout: light modules stay light, and every setting has one source."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from jaxdream.recipe import NORMALISERS, OBJECTIVES, UPDATES, Recipe


@pytest.mark.parametrize(("module", "heavy"), [
    ("jaxdream.config", "jax"), ("jaxdream.config", "flax"), ("jaxdream.config", "optax"),
    ("jaxdream.models", "jax"), ("jaxdream.cli", "jax"), ("jaxdream.jobs.manifest", "ray"),
])
def test_checking_settings_imports_no_accelerator_library(module: str, heavy: str) -> None:
    code = f"import sys, {module}; assert {heavy!r} not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_program_settings_take_their_defaults_from_the_recipe() -> None:
    from jaxdream.ascent import StaticSettings

    settings, recipe = StaticSettings(("block10",)), Recipe()
    for field in dataclasses.fields(StaticSettings):
        if hasattr(recipe, field.name) and field.name != "layers":
            assert getattr(settings, field.name) == getattr(recipe, field.name), field.name


def test_every_kind_the_recipe_offers_is_implemented() -> None:
    from jaxdream import ascent
    from jaxdream.objectives import Term

    assert set(ascent._SHAPING) == set(NORMALISERS) and set(ascent._ASCENT) == set(UPDATES)
    for kind in OBJECTIVES:
        Term(kind, "block10")  # an unknown kind raises


def test_every_recipe_field_is_a_dream_option_with_its_default_in_the_help() -> None:
    from jaxdream.cli import build_parser

    parser = build_parser()
    dream = parser._subparsers._group_actions[0].choices["dream"]  # type: ignore[union-attr]
    options = {action.dest: action for action in dream._actions}
    for field in dataclasses.fields(Recipe):
        assert field.name in options, field.name
        action = options[field.name]
        assert action.default is None, "a left-out option leaves the value to the layers below"
        shown = field.metadata["shown"] or field.default
        assert f"(default: {shown})" in " ".join(action.help.split()), field.name
    assert options["objective"].choices == list(OBJECTIVES)


def test_a_model_is_registered_once() -> None:
    from jaxdream.models import MODELS
    from jaxdream.models.registry import register

    with pytest.raises(ValueError, match="registered twice"):
        register(MODELS["vgg16"])
