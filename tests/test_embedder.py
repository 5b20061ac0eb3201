"""Embedder: GeM pooling, unit-norm float32 vectors, batch consistency, devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from visualsearch.embedder import Embedder, gem_pool, resolve_device
from visualsearch.errors import ConfigurationError

from .conftest import TINY


def test_gem_is_between_average_and_max_pooling():
    feature_map = torch.rand(2, 5, 7, 7)
    pooled = gem_pool(feature_map)
    assert pooled.shape == (2, 5)
    assert torch.all(pooled >= feature_map.mean(dim=(2, 3)) - 1e-6)
    assert torch.all(pooled <= feature_map.amax(dim=(2, 3)) + 1e-6)
    assert torch.allclose(gem_pool(feature_map, p=1.0), feature_map.clamp(min=1e-6).mean(dim=(2, 3)))


def test_embeddings_are_unit_float32_and_batch_independent(tiny_weights):
    embedder = Embedder(TINY, weights_path=tiny_weights)
    images = [Image.new("RGB", (50, 40), colour) for colour in ((255, 0, 0), (0, 255, 0), (20, 30, 200))]
    images[2].paste((255, 255, 0), (0, 0, 20, 20))
    vectors = embedder.embed_images(images)
    assert vectors.dtype == np.float32 and vectors.shape == (3, 32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    alone = embedder.embed_images(images[2:])
    assert np.allclose(alone[0], vectors[2], atol=1e-5)
    assert embedder.embed_images([]).shape == (0, 32)


def test_identity_carries_the_weights_hash(tiny_weights):
    identity = Embedder(TINY, weights_path=tiny_weights).identity
    assert identity.backbone == TINY and identity.dim == 32 and len(identity.weights_sha256) == 64


def test_devices():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigurationError, match="no CUDA"):
            resolve_device("cuda")
    with pytest.raises(ConfigurationError):
        resolve_device("tpu7")
