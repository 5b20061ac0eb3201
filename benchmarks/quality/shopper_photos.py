"""Synthesis of hard shopper photos: a product cut out, cropped, warped and pasted small into clutter.

Builds on :func:`benchmarks.demo_retrieval.shopper_photo` (crop, tilt, colour jitter, JPEG 40),
which here is the "phone" stage applied to a whole cluttered scene rather than to the
clean catalogue shot. Everything draws from the ``random.Random`` it is given, so a
seed fixes every pixel.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from benchmarks.demo_retrieval import shopper_photo

from .common import jpeg_bytes

FRAME = (800, 600)  # landscape; portrait frames swap it
# Longest side of the product as a share of the frame's shorter side, before the phone
# stage crops the frame to 60-85 %: the product ends up about 30-60 % of the final photo.
PRODUCT_SHARE = (0.28, 0.45)
CLUTTER_SHARE = (0.10, 0.22)  # smaller than the product, so the photo is still of it
CLUTTER_ITEMS = (3, 6)
KEEP_OF_PRODUCT = (0.65, 0.95)  # the strong crop: share of each side of the product kept
ROTATION_DEGREES = 25
PERSPECTIVE_JITTER = 0.10  # corner displacement, share of the product's size
FINAL_LONG_SIDE = 640
FINAL_JPEG_QUALITY = (18, 35)
# Near-white pixels connected to the border are a catalogue shot's background.
WHITE_LEVEL = 236


def cutout(image: Image.Image) -> Image.Image:
    """The product of a catalogue shot on white as RGBA, cropped to it.

    The background is the near-white region connected to the image border, so white
    parts inside the product (a white shoe's sole, a label) stay opaque.
    """
    from scipy import ndimage  # scikit-image's dependency, with the dev extras

    rgb = np.asarray(image.convert("RGB"))
    white = rgb.min(axis=2) >= WHITE_LEVEL
    labels, _ = ndimage.label(white)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background = np.isin(labels, border[border > 0])
    alpha = Image.fromarray(np.where(background, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))
    rgba = image.convert("RGB").copy()
    rgba.putalpha(alpha)
    box = alpha.getbbox()
    return rgba.crop(box) if box else rgba


def colourised(grey: np.ndarray, rng: random.Random, size: int = 224) -> Image.Image:
    """A product-like RGBA picture from a white-on-black greyscale item (Fashion-MNIST style).

    Upscaled to ``size``, painted in a random colour (sometimes striped with a second one),
    shaded by the original intensities; transparent where the original is black.
    """
    big = np.asarray(Image.fromarray(grey).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    colours = [np.array(_random_colour(rng), dtype=np.float32) for _ in range(2)]
    paint = np.broadcast_to(colours[0], (size, size, 3)).copy()
    if rng.random() < 0.35:
        angle, width = rng.uniform(0, np.pi), rng.uniform(6, 24)
        y, x = np.mgrid[0:size, 0:size]
        stripes = ((x * np.cos(angle) + y * np.sin(angle)) // width) % 2 == 1
        paint[stripes] = colours[1]
    shade = 0.45 + 0.55 * big[..., None]
    rgb = np.clip(paint * shade, 0, 255).astype(np.uint8)
    alpha = (np.clip((big - 0.02) * 12.0, 0, 1) * 255).astype(np.uint8)  # dark fabric stays opaque
    return Image.fromarray(np.dstack([rgb, alpha]))


def on_white(rgba: Image.Image) -> Image.Image:
    canvas = Image.new("RGB", rgba.size, (255, 255, 255))
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas


def _random_colour(rng: random.Random) -> tuple[int, int, int]:
    import colorsys

    red, green, blue = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.15, 0.9), rng.uniform(0.3, 0.95))
    return int(red * 255), int(green * 255), int(blue * 255)


def busy_background(size: tuple[int, int], rng: random.Random, photos: list[Image.Image]) -> Image.Image:
    """A cluttered RGB scene: a random crop of a real photo, or coloured blotchy noise."""
    width, height = size
    if photos and rng.random() < 0.65:
        photo = photos[rng.randrange(len(photos))]
        share = rng.uniform(0.4, 1.0)
        crop_w = min(photo.width, int(photo.height * share * width / height))
        crop_h = min(photo.height, int(crop_w * height / width))
        left, top = rng.randint(0, photo.width - crop_w), rng.randint(0, photo.height - crop_h)
        scene = photo.crop((left, top, left + crop_w, top + crop_h)).resize(size, Image.BILINEAR)
        return scene.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else scene
    noise = np.random.default_rng(rng.getrandbits(64))
    coarse = noise.integers(0, 256, (rng.randint(3, 9), rng.randint(3, 9), 3), dtype=np.uint8)
    scene = np.asarray(Image.fromarray(coarse).resize(size, Image.BICUBIC), dtype=np.int16)
    grain = noise.normal(0, rng.uniform(8, 30), (height, width, 3))
    return Image.fromarray(np.clip(scene + grain, 0, 255).astype(np.uint8))


def _fit(rgba: Image.Image, longest: int) -> Image.Image:
    scale = longest / max(rgba.size)
    return rgba.resize((max(1, round(rgba.width * scale)), max(1, round(rgba.height * scale))), Image.BICUBIC)


def _perspective(rgba: Image.Image, rng: random.Random) -> Image.Image:
    """``rgba`` seen from a slight angle: its corners moved by up to PERSPECTIVE_JITTER of its size."""
    pad_w, pad_h = int(rgba.width * 0.15), int(rgba.height * 0.15)
    canvas = Image.new("RGBA", (rgba.width + 2 * pad_w, rgba.height + 2 * pad_h), (0, 0, 0, 0))
    canvas.paste(rgba, (pad_w, pad_h))
    width, height = canvas.size
    corners = [(0, 0), (width, 0), (width, height), (0, height)]
    moved = [(x + rng.uniform(-1, 1) * PERSPECTIVE_JITTER * width, y + rng.uniform(-1, 1) * PERSPECTIVE_JITTER * height)
             for x, y in corners]
    # PIL maps each output pixel back to the input: solve for the homography moved -> corners.
    rows, values = [], []
    for (x, y), (u, v) in zip(moved, corners):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        values += [u, v]
    coefficients = np.linalg.solve(np.array(rows, dtype=float), np.array(values, dtype=float))
    return canvas.transform(canvas.size, Image.PERSPECTIVE, tuple(coefficients.tolist()), Image.BICUBIC)


def _strong_crop(rgba: Image.Image, rng: random.Random) -> Image.Image:
    keep_w, keep_h = (int(side * rng.uniform(*KEEP_OF_PRODUCT)) for side in rgba.size)
    left, top = rng.randint(0, rgba.width - keep_w), rng.randint(0, rgba.height - keep_h)
    return rgba.crop((left, top, left + keep_w, top + keep_h))


def _paste(scene: Image.Image, rgba: Image.Image, centre: tuple[float, float]) -> None:
    x, y = int(centre[0] - rgba.width / 2), int(centre[1] - rgba.height / 2)
    scene.paste(rgba, (x, y), mask=rgba.getchannel("A"))


def _colour_cast(scene: Image.Image, rng: random.Random) -> Image.Image:
    """Lamp light or shade: per-channel gains, then brightness, contrast and saturation off by up to 35 %."""
    gains = np.array([rng.uniform(0.8, 1.2) for _ in range(3)], dtype=np.float32)
    scene = Image.fromarray(np.clip(np.asarray(scene, dtype=np.float32) * gains, 0, 255).astype(np.uint8))
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        scene = enhancer(scene).enhance(rng.uniform(0.65, 1.35))
    return scene


def hard_shopper_photo(product: Image.Image, rng: random.Random, *, photos: list[Image.Image],
                       clutter: list[Image.Image]) -> bytes:
    """A hard shopper photo (JPEG bytes) of ``product`` (an RGBA cutout).

    Args:
        product: the product, as :func:`cutout` returns it.
        rng: the only source of randomness.
        photos: real photos to use as backgrounds (noise when empty or by chance).
        clutter: other RGBA items (other products) scattered around it, smaller.

    The product is strongly cropped, warped in perspective, rotated up to 25 degrees and
    pasted at about a third of the frame near its middle over a busy scene; then the
    scene gets a colour cast, blur and sensor noise, goes through ``shopper_photo``
    (crop to 60-85 %, tilt, jitter, JPEG 40) and is sent again at JPEG quality 18-35.
    """
    size = FRAME if rng.random() < 0.5 else FRAME[::-1]
    scene = busy_background(size, rng, photos)
    short = min(size)
    for _ in range(rng.randint(*CLUTTER_ITEMS) if clutter else 0):
        item = _fit(clutter[rng.randrange(len(clutter))], int(short * rng.uniform(*CLUTTER_SHARE)))
        item = item.rotate(rng.uniform(-40, 40), resample=Image.BICUBIC, expand=True)
        _paste(scene, item, (rng.uniform(0, size[0]), rng.uniform(0, size[1])))
    item = _perspective(_strong_crop(product, rng), rng)
    item = item.rotate(rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES), resample=Image.BICUBIC, expand=True)
    item = _fit(item, int(short * rng.uniform(*PRODUCT_SHARE)))
    # Near the middle, so the phone stage's crop (which always keeps the centre) keeps it.
    _paste(scene, item, (size[0] * rng.uniform(0.4, 0.6), size[1] * rng.uniform(0.4, 0.6)))
    scene = _colour_cast(scene, rng).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.8)))
    grain = np.random.default_rng(rng.getrandbits(64)).normal(0, rng.uniform(2, 8), (size[1], size[0], 3))
    scene = Image.fromarray(np.clip(np.asarray(scene, dtype=np.float32) + grain, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    scene.save(buffer, format="PNG")
    phone = Image.open(io.BytesIO(shopper_photo(io.BytesIO(buffer.getvalue()), rng)))
    phone = _fit(phone.convert("RGBA"), FINAL_LONG_SIDE).convert("RGB")
    return jpeg_bytes(phone, rng.randint(*FINAL_JPEG_QUALITY))


def scikit_image_photos() -> list[Image.Image]:
    """The colour photos bundled with scikit-image (astronaut, coffee, chelsea...), [] without it.

    Read from the package's own folder, never through its downloader.
    """
    try:
        import skimage.data
    except ImportError:
        return []
    folder = Path(skimage.data.__file__).parent
    names = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "ihc.png")
    photos = []
    for name in names:
        if (folder / name).is_file():
            with Image.open(folder / name) as image:
                photos.append(image.convert("RGB"))
    return photos
