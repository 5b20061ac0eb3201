"""Decode catalogue files and phone uploads into clean RGB images, or fail with one typed error."""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass
from typing import BinaryIO, Union

from PIL import Image, UnidentifiedImageError

from .errors import (
    ImageDecodeError,
    ImageTooLargeError,
    InvalidRequestError,
    UnsupportedImageError,
)

logger = logging.getLogger(__name__)

ImageSource = Union[str, os.PathLike, bytes, BinaryIO]

# Formats a shop really receives. Anything else (PDF, PSD, EPS via Ghostscript...) is
# refused before decoding: fewer decoders exposed to uploads, clearer errors.
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF", "MPO"})
# Decoders to try; MPO (multi-picture JPEG from cameras) is opened by the JPEG one.
_OPENERS = sorted(SUPPORTED_FORMATS - {"MPO"})

# 40 megapixels covers every phone camera today (a 48 MP sensor bins to 12 MP).
DEFAULT_MAX_PIXELS = 40_000_000
# Longest side / shortest side. The preprocessing scales the short side up or down to
# the model's input (224), so a few-byte 100000x1 PNG would become a 22,400,000x224
# tensor (gigabytes). At 20:1 that tensor is at most 4,480x224 (3 MB). Real photos
# are far inside: phone panoramas are about 4:1 to 9:1 and long scrolling screenshots
# stay under 20:1; beyond that the model's centre square sees under 1/20 of the
# picture, so the search would be meaningless anyway.
MAX_ASPECT_RATIO = 20
# Before the model's own resize, box-reduce big decodes to this many times the side the
# caller needs: Pillow's docs call a reducing_gap of 3 "indistinguishable from fair
# resampling", and the transform is spared a float copy of a full-size decode.
REDUCING_GAP = 3
# Modes whose pixels can be averaged as they are (not palette indices, not 1 or 16 bits).
_REDUCIBLE_MODES = frozenset({"RGB", "RGBA", "L", "LA", "CMYK", "I", "F"})

WHITE = (255, 255, 255)
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}  # the ones that swap width and height
_TRANSPOSE_BY_ORIENTATION = {  # as in ImageOps.exif_transpose
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_heif_registered = False


def register_heif_opener() -> None:
    """Teach Pillow HEIC/HEIF (iPhone photos) once, on first use rather than at import."""
    global _heif_registered
    if _heif_registered:
        return
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
    except ImportError:  # pragma: no cover - pillow-heif is a hard dependency
        logger.warning("pillow-heif is not installed: HEIC photos cannot be read")
    _heif_registered = True


@dataclass(frozen=True)
class Crop:
    """A rectangle in pixels of the (orientation-corrected) image."""

    x: int
    y: int
    width: int
    height: int

    @classmethod
    def parse(cls, text: str) -> "Crop":
        """Parse ``"x,y,w,h"``; raises ``ValueError`` with a readable message."""
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 4:
            raise ValueError(f"crop must be 'x,y,w,h' in pixels, got {text!r}")
        try:
            x, y, w, h = (int(float(p)) for p in parts)
        except (ValueError, OverflowError):  # OverflowError: "inf"
            raise ValueError(f"crop must be four numbers 'x,y,w,h', got {text!r}") from None
        if x < 0 or y < 0 or w <= 0 or h <= 0:
            raise ValueError(f"crop needs x,y >= 0 and w,h > 0, got {text!r}")
        return cls(x, y, w, h)


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        # formats=: only the decoders we accept ever see an upload's bytes.
        return Image.open(source, formats=_OPENERS)
    except FileNotFoundError:
        raise
    except UnidentifiedImageError:
        raise UnsupportedImageError(
            "not a supported image: expected JPEG, PNG, WebP, HEIC, AVIF, GIF, BMP or TIFF"
        ) from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(str(exc)) from None
    except Exception as exc:  # Pillow's plugins raise many types on hostile headers
        raise ImageDecodeError(f"cannot read image header: {exc}") from None


def is_image_data(data: bytes) -> bool:
    """Whether ``data`` starts like an image in a supported format (its header only is read)."""
    register_heif_opener()
    try:
        with _open(data) as image:
            return image.format in SUPPORTED_FORMATS
    except ImageTooLargeError:
        return True  # an image all right; decoding it says it is too large
    except (UnsupportedImageError, ImageDecodeError):
        return False


def load_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    target_size: int | None = None,
    crop: Crop | None = None,
) -> Image.Image:
    """Decode ``source`` into an upright RGB image.

    Args:
        source: a path, raw bytes or a binary file object.
        max_pixels: refuse images with more pixels than this (decompression bombs).
        target_size: the smallest side the caller needs; large JPEGs are then decoded
            at a reduced scale (2x-8x faster) and other large images are box-reduced to
            no less than ``REDUCING_GAP`` times it. ``None`` keeps the full size.
        crop: optional rectangle, in pixels of the upright image, to keep.

    Returns:
        A fully loaded ``PIL.Image`` in mode ``RGB``; transparency is composited on white.
        ``info["format"]`` is the file's format and ``info["source_size"]`` its upright
        (width, height) before any reduced decoding or crop.

    Raises:
        UnsupportedImageError: not an image, or a format we do not accept.
        ImageDecodeError: a supported format whose data is corrupt or truncated.
        ImageTooLargeError: more than ``max_pixels`` pixels, or sides that differ more
            than ``MAX_ASPECT_RATIO``:1 (both read from the header, before decoding).
        InvalidRequestError: the crop lies outside the image, or its sides differ more
            than ``MAX_ASPECT_RATIO``:1.
        FileNotFoundError: ``source`` is a path that does not exist.
    """
    register_heif_opener()
    if isinstance(source, (str, os.PathLike)):
        # Our own handle, closed whatever happens: a Pillow plugin that raises while
        # reading a hostile header would otherwise leave the file it opened to the GC.
        with open(source, "rb") as handle:
            return load_image(handle, max_pixels=max_pixels, target_size=target_size, crop=crop)
    image = _open(source)
    try:
        result = _to_clean_rgb(image, max_pixels=max_pixels, target_size=target_size, crop=crop)
        # Nothing needed a copy (an upright, small RGB file): detach it from the file.
        return result.copy() if result is image else result
    except (ImageTooLargeError, ImageDecodeError, UnsupportedImageError, InvalidRequestError):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(str(exc)) from None
    except Exception as exc:  # corrupt data surfaces as OSError, struct.error, TypeError...
        raise ImageDecodeError(f"cannot decode {image.format or 'image'} data: {exc}") from None
    finally:
        image.close()


def _to_clean_rgb(
    image: Image.Image, *, max_pixels: int, target_size: int | None, crop: Crop | None
) -> Image.Image:
    if image.format not in SUPPORTED_FORMATS:
        raise UnsupportedImageError(
            f"{image.format or 'unknown'} images are not supported: "
            "use JPEG, PNG, WebP, HEIC, AVIF, GIF, BMP or TIFF"
        )
    file_format = image.format
    width, height = image.size  # from the header: nothing is decoded yet
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}"
        )
    if _too_elongated(width, height):
        raise ImageTooLargeError(
            f"the image is {width}x{height} pixels: its sides differ more than {MAX_ASPECT_RATIO}:1"
        )
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)  # animations: the first frame is the product shot
    if target_size and image.format == "JPEG" and crop is None:
        # draft() picks the largest 1/2, 1/4 or 1/8 DCT scale that stays >= the request,
        # so the model still gets at least target_size pixels on the short side.
        scale = min(width, height) / target_size
        if scale >= 2:
            image.draft("RGB", (round(width / scale), round(height / scale)))
    with warnings.catch_warnings():
        # Pillow warns about palette transparency given as bytes; we handle it below.
        warnings.simplefilter("ignore", UserWarning)
        image.load()
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    source_size = (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)
    # Each step below makes at most one copy; reducing first keeps the copies small. The
    # crop is in pixels of the full-size upright image, so with a crop we reduce after it.
    if crop is None:
        image = _reduce(image, target_size)
    image = _upright(image, orientation)
    if crop is not None:
        image = _reduce(_apply_crop(image, crop), target_size)
    result = _reduce(_to_rgb(image), target_size)  # palette and 16-bit modes reduce once RGB
    result.info.update(format=file_format, source_size=source_size)
    return result


def _upright(image: Image.Image, orientation: int) -> Image.Image:
    """Apply the EXIF orientation (ImageOps.exif_transpose would copy even upright images)."""
    method = _TRANSPOSE_BY_ORIENTATION.get(orientation)
    return image if method is None else image.transpose(method)


def _reduce(image: Image.Image, target_size: int | None) -> Image.Image:
    """Box-average ``image`` down to a short side of ``REDUCING_GAP * target_size``, if larger.

    Bounds what reaches the model's transform (which makes float copies of its input)
    to about REDUCING_GAP**2 * MAX_ASPECT_RATIO * target_size**2 pixels, 9 MP at 224.
    """
    if not target_size or image.mode not in _REDUCIBLE_MODES:
        return image
    scale = REDUCING_GAP * target_size / min(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BOX)


def _apply_crop(image: Image.Image, crop: Crop) -> Image.Image:
    width, height = image.size
    if crop.x >= width or crop.y >= height:
        raise InvalidRequestError(
            f"crop {crop.x},{crop.y},{crop.width},{crop.height} lies outside the "
            f"{width}x{height} image"
        )
    box = (crop.x, crop.y, min(width, crop.x + crop.width), min(height, crop.y + crop.height))
    kept_width, kept_height = box[2] - box[0], box[3] - box[1]
    if _too_elongated(kept_width, kept_height):
        raise InvalidRequestError(
            f"crop {crop.x},{crop.y},{crop.width},{crop.height} keeps {kept_width}x{kept_height} pixels: "
            f"its sides differ more than {MAX_ASPECT_RATIO}:1"
        )
    return image.crop(box)


def _too_elongated(width: int, height: int) -> bool:
    return max(width, height) > MAX_ASPECT_RATIO * min(width, height)



def _to_rgb(image: Image.Image) -> Image.Image:
    """Every mode Pillow can hand us -> RGB, compositing any transparency on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        has_alpha = "transparency" in image.info or image.palette.mode == "RGBA"
        image = image.convert("RGBA" if has_alpha else "RGB")
        return _to_rgb(image)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greyscale: scale to 8 bits rather than clip at 255.
        image = image.point(lambda v: v / 256).convert("L")
        return image.convert("RGB")
    if mode == "F":
        return image.convert("L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "L" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    # Everything else, CMYK included (Pillow already undoes Adobe's inverted CMYK).
    return image.convert("RGB")
