"""Image loading: every mode and format a catalogue or a phone produces, and clean failures."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from visualsearch.errors import ImageDecodeError, ImageTooLargeError, InvalidRequestError, UnsupportedImageError
from visualsearch.images import MAX_ASPECT_RATIO, REDUCING_GAP, Crop, load_image


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


def test_fuzzed_files_are_decode_errors_not_crashes():
    """Found by mutating real files: Pillow raised TypeError / struct.error on these."""
    with pytest.raises(ImageDecodeError):
        load_image((Path(__file__).parent / "data" / "fuzzed-missing-dimensions.tif").read_bytes())


def test_broken_exif_beside_a_valid_orientation_still_decodes():
    """ImageOps.exif_transpose raised struct.error rewriting this file's EXIF; only the
    orientation is read now, so the picture decodes, turned upright."""
    image = load_image((Path(__file__).parent / "data" / "fuzzed-bad-exif.jpg").read_bytes())
    assert image.mode == "RGB" and image.size == (40, 40)


def test_info_reports_the_files_format_and_upright_size_before_reduced_decoding():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.new("RGB", (2000, 1000), (9, 9, 9)), "JPEG", exif=exif)
    image = load_image(data, target_size=232)
    assert image.info["format"] == "JPEG" and image.info["source_size"] == (1000, 2000)
    assert image.size[0] < image.size[1] and min(image.size) >= 232


def _gif_declaring(width: int, height: int) -> bytes:
    """43 bytes: a 1x1 frame on a logical screen of width x height, which Pillow allocates."""
    data = bytearray(encode(Image.new("L", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


@pytest.mark.parametrize("data, size", [
    (encode(Image.new("RGB", (100_000, 1)), "PNG"), "100000x1"),  # 370 bytes; 9.8 GB at 224
    (encode(Image.new("RGB", (1, 5000)), "PNG"), "1x5000"),
    (_gif_declaring(10_799, 1), "10799x1"),  # 43 bytes; cost 6 s and 1.7 GB
])
def test_elongated_images_are_refused_from_their_header(data, size, monkeypatch):
    def no_decoding(self):
        raise AssertionError("decoded a refused image")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageTooLargeError, match=f"the image is {size} pixels: its sides differ more than 20:1"):
        load_image(data, target_size=224)


def test_the_widest_accepted_shape_is_twenty_to_one():
    assert MAX_ASPECT_RATIO == 20
    assert load_image(encode(Image.new("RGB", (2000, 100)), "PNG"), target_size=224).size == (2000, 100)
    with pytest.raises(ImageTooLargeError):
        load_image(encode(Image.new("RGB", (2001, 100)), "PNG"))  # also without target_size


def test_a_crop_cannot_make_an_elongated_image():
    data = encode(Image.new("RGB", (4000, 200)), "PNG")
    with pytest.raises(InvalidRequestError, match="keeps 4000x1 pixels: its sides differ more than 20:1"):
        load_image(data, target_size=224, crop=Crop(0, 0, 4000, 1))
    # Measured on what the crop keeps inside the image, not on the rectangle asked for.
    assert load_image(data, crop=Crop(0, 0, 100, 100_000)).size == (100, 200)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16"])
def test_large_images_are_reduced_before_the_model_sees_them(mode):
    image = Image.new(mode, (3000, 2000), 255 if mode in ("L", "P") else None)
    if mode == "I;16":
        image = Image.fromarray(np.full((2000, 3000), 65535, dtype=np.uint16))
    result = load_image(encode(image, "PNG"), target_size=224)
    assert result.mode == "RGB" and min(result.size) == REDUCING_GAP * 224 and result.size[0] == 1008
    assert result.info["source_size"] == (3000, 2000)
    assert load_image(encode(image, "PNG")).size == (3000, 2000)  # no target_size: full size


def test_reduction_keeps_colours_and_composites_transparency_on_white():
    image = Image.new("RGBA", (2400, 1600), (0, 0, 0, 0))
    image.paste((200, 10, 10, 255), (0, 0, 1200, 1600))
    result = load_image(encode(image, "PNG"), target_size=224)
    assert result.size == (1008, 672)
    assert result.getpixel((10, 300)) == (200, 10, 10) and result.getpixel((1000, 300)) == (255, 255, 255)


def test_orientation_is_applied_after_reduction_and_before_a_crop():
    image = Image.new("RGB", (3000, 1500), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 1500, 1500))  # red left half; rotated 90 cw: red on top
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(image, "PNG", exif=exif)
    reduced = load_image(data, target_size=224)
    assert reduced.size == (672, 1344) and reduced.info["source_size"] == (1500, 3000)
    assert reduced.getpixel((336, 100))[0] > 200 and reduced.getpixel((336, 1200))[2] > 200
    cropped = load_image(data, target_size=224, crop=Crop(0, 2000, 1500, 1000))  # upright pixels
    assert cropped.size == (1008, 672) and cropped.getpixel((500, 300))[2] > 200


def test_small_upright_rgb_files_come_back_detached_from_the_file(tmp_path):
    path = tmp_path / "small.png"
    Image.new("RGB", (30, 20), (1, 2, 3)).save(path)
    image = load_image(path, target_size=224)
    assert image.getpixel((0, 0)) == (1, 2, 3) and image.size == (30, 20)
