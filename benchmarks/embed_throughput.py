"""Embedding throughput of a backbone (images/s through the CNN, preprocessing excluded).

    python -m benchmarks.embed_throughput [--backbone NAME] [--device cpu|cuda] [--batch-sizes 1,32]

Also checks the device against the CPU: the same images must give the same vectors
(cosine > 0.999) and the ImageNet head must call scikit-image's coffee photo an espresso.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def measure(embedder, batch_size: int, seconds: float = 5.0) -> float:
    batch = torch.randn(batch_size, 3, embedder.input_size, embedder.input_size)
    embedder.embed_batch(batch)  # warm-up: cuDNN / oneDNN pick their kernels
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        embedder.embed_batch(batch)  # .cpu() inside synchronises a CUDA device
        count += batch_size
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-sizes", default="1,32", help="comma-separated")
    parser.add_argument("--seconds", type=float, default=5.0, help="time per measurement")
    args = parser.parse_args()

    import skimage.data
    from PIL import Image
    from torchvision.models import ResNet50_Weights

    from visualsearch.embedder import Embedder

    embedder = Embedder(args.backbone, device=args.device, threads=args.threads)
    if embedder.device.type == "cuda":
        where = torch.cuda.get_device_name(embedder.device)
    else:
        where = f"{torch.get_num_threads()} threads"
    print(f"backbone {args.backbone} on {embedder.device} ({where})")
    photos = [Image.fromarray(skimage.data.coffee()), Image.fromarray(skimage.data.chelsea()),
              Image.fromarray(skimage.data.astronaut())]
    categories = ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    top1 = categories[int(embedder.classify(photos[:1]).argmax())]
    print(f"coffee photo -> {top1}")
    if embedder.device.type != "cpu":
        reference = Embedder(args.backbone, device="cpu").embed_images(photos)
        agreement = np.sum(reference * embedder.embed_images(photos), axis=1)
        print(f"cosine(cpu, {embedder.device}) per photo: {np.round(agreement, 5).tolist()}")
        assert agreement.min() > 0.999, "device embeddings differ from the CPU's"
    assert top1 == "espresso", "pretrained weights or preprocessing are wrong"
    for batch_size in (int(size) for size in args.batch_sizes.split(",")):
        print(f"batch {batch_size:>4}: {measure(embedder, batch_size, args.seconds):8.1f} images/s")


if __name__ == "__main__":
    main()
