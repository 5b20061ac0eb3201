"""Image loading: every mode and format a catalogue or a phone produces, and clean failures."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visualsearch.errors import ImageDecodeError, ImageTooLargeError, InvalidRequestError, UnsupportedImageError
from visualsearch.images import Crop, load_image


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent red
    image.paste((0, 0, 255, 255), (5, 5, 15, 15))
    result = load_image(encode(image, "PNG"))
    assert result.mode == "RGB"
    assert result.getpixel((0, 0)) == (255, 255, 255)
    assert result.getpixel((10, 10)) == (0, 0, 255)


def test_la_and_palette_with_transparency_become_rgb_on_white():
    la = Image.new("LA", (8, 8), (0, 0))
    assert load_image(encode(la, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    data = encode(palette, "PNG", transparency=0)
    assert load_image(data).getpixel((0, 0)) == (255, 255, 255)
    opaque = encode(palette, "PNG")
    assert load_image(opaque).getpixel((0, 0)) == (10, 20, 30)


def test_cmyk_jpeg_greyscale_and_16_bit():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red in CMYK
    red = load_image(encode(cmyk, "JPEG"))
    assert red.mode == "RGB" and red.getpixel((4, 4))[0] > 200 and red.getpixel((4, 4))[1] < 60
    grey = load_image(encode(Image.new("L", (8, 8), 128), "PNG"))
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (128, 128, 128)
    sixteen = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    assert load_image(encode(sixteen, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    result = load_image(encode(image, "JPEG", exif=exif))
    assert result.size == (20, 40)


def test_first_frame_of_an_animation():
    frames = [Image.new("RGB", (10, 10), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    pixel = load_image(buffer.getvalue()).getpixel((5, 5))
    assert pixel[0] > 200 and pixel[2] < 50


@pytest.mark.parametrize("format", ["WEBP", "AVIF"])
def test_webp_and_avif(format):
    image = Image.new("RGB", (16, 16), (0, 200, 0))
    result = load_image(encode(image, format))
    assert result.mode == "RGB" and result.getpixel((8, 8))[1] > 150


def test_heic_from_a_phone():
    import pillow_heif

    pillow_heif.register_heif_opener()
    data = encode(Image.new("RGB", (64, 64), (200, 0, 0)), "HEIF")
    result = load_image(data)
    assert result.size == (64, 64) and result.getpixel((32, 32))[0] > 150


def test_large_jpeg_is_decoded_at_reduced_size_but_not_below_target():
    image = Image.new("RGB", (2000, 1600), (10, 10, 10))
    data = encode(image, "JPEG")
    reduced = load_image(data, target_size=224)
    assert 224 <= min(reduced.size) < 800
    assert load_image(data).size == (2000, 1600)


def test_decompression_bomb_is_refused():
    data = encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(ImageTooLargeError, match="limit"):
        load_image(data, max_pixels=1_000_000)


def test_not_an_image_and_unsupported_format():
    with pytest.raises(UnsupportedImageError):
        load_image(b"hello, this is text")
    with pytest.raises(UnsupportedImageError):
        load_image(encode(Image.new("RGB", (8, 8)), "PDF"))


def test_truncated_jpeg_is_a_decode_error():
    data = encode(Image.new("RGB", (256, 256), (1, 2, 3)), "JPEG")
    with pytest.raises(ImageDecodeError):
        load_image(data[: len(data) // 3])


def test_crop_and_its_validation():
    image = Image.new("RGB", (100, 50), (255, 255, 255))
    image.paste((0, 0, 0), (50, 0, 100, 50))
    cropped = load_image(encode(image, "PNG"), crop=Crop.parse("60,10,20,20"))
    assert cropped.size == (20, 20) and cropped.getpixel((10, 10)) == (0, 0, 0)
    with pytest.raises(InvalidRequestError):
        load_image(encode(image, "PNG"), crop=Crop(200, 0, 10, 10))
    for bad in ("1,2,3", "a,b,c,d", "0,0,0,10", "-1,0,5,5"):
        with pytest.raises(ValueError):
            Crop.parse(bad)


@pytest.mark.parametrize("name", ["fuzzed-missing-dimensions.tif", "fuzzed-bad-exif.jpg"])
def test_fuzzed_files_are_decode_errors_not_crashes(name):
    """Found by mutating real files: Pillow raised TypeError / struct.error on these."""
    with pytest.raises(ImageDecodeError):
        load_image((Path(__file__).parent / "data" / name).read_bytes())


def test_info_reports_the_files_format_and_upright_size_before_reduced_decoding():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.new("RGB", (2000, 1000), (9, 9, 9)), "JPEG", exif=exif)
    image = load_image(data, target_size=232)
    assert image.info["format"] == "JPEG" and image.info["source_size"] == (1000, 2000)
    assert image.size[0] < image.size[1] and min(image.size) >= 232
