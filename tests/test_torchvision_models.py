"""Each torchvision model classifies like torchvision and dreams through the CLI, from a
checkpoint file given with --weights (random weights: nothing is downloaded in tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from jaxdream.classify import classify
from jaxdream.cli import main
from jaxdream.images import load_rgb, read_recipe
from jaxdream.models import MODELS, load_model

from conftest import EXAMPLES

TORCHVISION_MODELS = ["googlenet", "vgg16", "resnet50"]


@pytest.fixture(scope="module")
def torchvision() -> Any:
    return pytest.importorskip("torchvision",
                               reason="torchvision not installed: parity with torchvision skipped")


def _random_torchvision(torchvision: Any, name: str) -> Any:
    import torch

    torch.manual_seed(0)
    if name == "googlenet":
        model = torchvision.models.googlenet(weights=None, aux_logits=False,
                                             transform_input=True, init_weights=True)
    else:
        model = getattr(torchvision.models, name)(weights=None)
    model.eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
        # Peaked class probabilities, so that comparing them tests more than a uniform 1/1000.
        final = model.fc if name != "vgg16" else model.classifier[6]
        final.weight.mul_(30.0 / final.weight.abs().max())
    return model


@pytest.fixture(scope="module", params=TORCHVISION_MODELS)
def checkpoint(request: pytest.FixtureRequest, torchvision: Any,
               tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Any]:
    import torch

    name = request.param
    if name not in MODELS:
        pytest.fail(f"model {name} is not registered")
    model = _random_torchvision(torchvision, name)
    path = tmp_path_factory.mktemp(name) / f"{name}-random.pth"
    torch.save(model.state_dict(), path)
    return name, path, model


def test_classify_matches_torchvision(checkpoint: tuple[str, Path, Any], torchvision: Any
                                      ) -> None:
    import torch
    from torchvision import transforms

    name, path, reference = checkpoint
    photo = load_rgb(EXAMPLES / "coffee.jpg")
    ours = classify(load_model(name, path), [photo], top=1000)[0]
    ours_probs = np.zeros(1000)
    for index, _, probability in ours:
        ours_probs[index] = probability
    view = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    with torch.no_grad():
        logits = reference(view(Image.fromarray(photo))[None])
    theirs = torch.softmax(logits, dim=1)[0].numpy()
    assert theirs.max() > 0.05, "the reference is too flat to test anything"
    np.testing.assert_allclose(ours_probs, theirs, atol=1e-4)
    assert int(np.argmax(ours_probs)) == int(np.argmax(theirs))


def test_dreams_through_the_cli(checkpoint: tuple[str, Path, Any], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    name, path, _ = checkpoint
    out = tmp_path / "out"
    code = main(["dream", str(EXAMPLES / "chelsea.jpg"), "-o", str(out), "--model", name,
                 "--weights", str(path), "--max-side", "64", "--octaves", "2", "--steps", "2",
                 "-q"])
    assert code == 0, capsys.readouterr().err
    recipe = read_recipe(out / "chelsea_dream.png")
    assert recipe["model"] == name
    assert recipe["layers"] == {MODELS[name].default_layers: 1.0}
    assert recipe["weights"] == path.name


def test_models_without_weights_say_how_to_get_them(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("JAXDREAM_CACHE", str(tmp_path))
    code = main(["classify", str(EXAMPLES / "chelsea.jpg"), "--model", "resnet50"])
    err = capsys.readouterr().err
    assert code == 2
    assert "jaxdream weights fetch resnet50" in err and "--weights FILE" in err


def test_the_catalogue_matches_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    for name, spec in MODELS.items():
        assert f"{name}: {spec.description}" in listing
        assert f"default layer: {spec.default_layers}" in listing
    # The last line names the devices JAX sees (so a user can tell whether a GPU is used).
    assert listing.strip().splitlines()[-1].startswith("devices: ")
    for name in ("googlenet", "vgg16", "resnet50"):
        assert main(["models", name]) == 0
        detail = capsys.readouterr().out
        for endpoint, (channels, _) in MODELS[name].endpoints.items():
            assert any(line.split()[:2] == [endpoint, str(channels)]
                       for line in detail.splitlines()), endpoint
    assert MODELS["googlenet"].default_layers == "inception4c"
