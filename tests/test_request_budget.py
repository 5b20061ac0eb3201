"""A search's memory and time stay within a stated budget, hostile images included.

Each case runs in a fresh child process that loads the backbone, warms up with one
ordinary search, resets its peak-RSS counter, then searches once with the case's file
and reports the error, the seconds and the peak RSS above that idle level (Linux
``/proc/self/status`` VmHWM). An address-space rlimit would not do: CUDA builds of
torch map gigabytes of virtual memory they never touch.

Print the whole table with ``.venv/bin/python -m tests.test_request_budget``.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from visualsearch.images import DEFAULT_MAX_PIXELS

from .conftest import REPO

# A search never uses more than this above idle (the process after loading the model
# and serving one search). The largest image allowed (DEFAULT_MAX_PIXELS = 40 MP) has
# to be decoded whole once: 3 bytes a pixel for RGB is 120 MB; RGBA needs 4 bytes and
# a premultiplied copy to reduce it (~320 MB). Everything after the decode is reduced
# to at most 3x the model's input, so the model's share is a few megabytes.
BUDGET_MB = 400
# Hostile files are refused from their header: no decoding, so a few megabytes at most.
REFUSED_BUDGET_MB = 16
REFUSED_SECONDS = 1.0


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "PNG")
    return buffer.getvalue()


def _gif_declaring(size: tuple[int, int]) -> bytes:
    """A 43-byte GIF: a 1x1 frame on a logical screen of ``size``, which Pillow allocates."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "GIF")
    data = bytearray(buffer.getvalue())
    data[6:10] = struct.pack("<HH", *size)
    return bytes(data)


def _jpeg(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (120, 80, 40)).save(buffer, "JPEG")
    return buffer.getvalue()


# name -> (file maker, expected error class name or None for a normal answer)
CASES = {
    "png-100000x1": (lambda: _png((100_000, 1)), "ImageTooLargeError"),
    "gif-declaring-10799x1": (lambda: _gif_declaring((10_799, 1)), "ImageTooLargeError"),
    "png-5000x1": (lambda: _png((5_000, 1)), "ImageTooLargeError"),
    "png-6300x6300-zeros": (lambda: _png((6300, 6300)), None),
    "png-6300x6300-rgba": (lambda: _png((6300, 6300), "RGBA"), None),
    "gif-declaring-6300x6300": (lambda: _gif_declaring((6300, 6300)), None),
    "jpeg-7000x5700": (lambda: _jpeg((7000, 5700)), None),
}
REFUSED = [name for name, (_, error) in CASES.items() if error]
ACCEPTED = [name for name, (_, error) in CASES.items() if not error]


def _memory_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_search(image_path: str, backbone: str, weights: str | None, data_dir: str) -> dict:
    """In a fresh process: one search of ``image_path``; its error, seconds and peak MB above idle."""
    from visualsearch.service import VisualSearch
    from visualsearch.settings import Settings

    settings = Settings(data_dir=Path(data_dir), backbone=backbone, weights=weights or None, workers=0)
    vs = VisualSearch(settings)
    vs.search(_png((640, 480)))  # warm-up: model, transform, thread pool, allocator
    data = Path(image_path).read_bytes()
    try:
        # "5" resets VmHWM to the current RSS (Linux >= 4.0): the peak below is this search's.
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        idle = _memory_mb("VmRSS")
    except OSError:  # not allowed here: fall back on the peak so far (warm-up included)
        idle = _memory_mb("VmHWM")
    started = time.perf_counter()
    error = message = None
    try:
        vs.search(data)
    except Exception as exc:  # reported to the parent, which checks the type
        error, message = type(exc).__name__, str(exc)
    seconds = time.perf_counter() - started
    return {"error": error, "message": message, "seconds": round(seconds, 3),
            "growth_mb": round(_memory_mb("VmHWM") - idle, 1), "idle_mb": round(idle, 1)}


def run_in_child(image_path: Path, *, backbone: str, weights: str | None, data_dir: Path) -> dict:
    code = ("import json, sys; import tests.conftest; from tests.test_request_budget import measure_search; "
            "print(json.dumps(measure_search(*sys.argv[1:5])))")
    args = [str(image_path), backbone, weights or "", str(data_dir)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    files = {}
    for name, (make, _) in CASES.items():
        files[name] = folder / name
        files[name].write_bytes(make())
    return files


def test_the_cases_are_what_they_claim(image_files):
    assert image_files["png-100000x1"].stat().st_size < 400
    assert image_files["gif-declaring-10799x1"].stat().st_size < 60
    with Image.open(image_files["png-6300x6300-zeros"]) as zeros:
        assert zeros.size == (6300, 6300) and 6300 * 6300 <= DEFAULT_MAX_PIXELS


@pytest.mark.parametrize("name", REFUSED)
def test_hostile_images_are_refused_fast_and_small(name, image_files, tiny_weights, tmp_path):
    from .conftest import TINY

    result = run_in_child(image_files[name], backbone=TINY, weights=str(tiny_weights), data_dir=tmp_path)
    assert result["error"] == CASES[name][1] and "differ more than 20:1" in result["message"], result
    assert result["seconds"] < REFUSED_SECONDS and result["growth_mb"] < REFUSED_BUDGET_MB, result


@pytest.mark.parametrize("name", ACCEPTED)
def test_largest_allowed_images_stay_within_the_budget(name, image_files, tiny_weights, tmp_path):
    from .conftest import TINY

    result = run_in_child(image_files[name], backbone=TINY, weights=str(tiny_weights), data_dir=tmp_path)
    assert result["error"] is None and result["growth_mb"] < BUDGET_MB, result


@pytest.mark.slow
def test_default_backbone_searches_the_largest_image_within_the_budget(image_files, tmp_path):
    result = run_in_child(image_files["png-6300x6300-zeros"], backbone="efficientnet_lite0", weights=None,
                          data_dir=tmp_path)
    assert result["error"] is None and result["growth_mb"] < BUDGET_MB and result["seconds"] < 20, result


def _print_table() -> None:  # pragma: no cover - a measuring aid, run by hand
    import tempfile

    import torch

    from .conftest import TINY, _TinyNet

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        torch.manual_seed(0)
        torch.save(_TinyNet().state_dict(), root / "tiny.pth")
        print(f"{'backbone':<20} {'case':<26} {'seconds':>8} {'MB above idle':>14}  error")
        for backbone, weights in ((TINY, str(root / "tiny.pth")), ("efficientnet_lite0", None)):
            for name, (make, _) in CASES.items():
                path = root / name
                path.write_bytes(make())
                result = run_in_child(path, backbone=backbone, weights=weights, data_dir=root / "data")
                print(f"{backbone:<20} {name:<26} {result['seconds']:>8.3f} {result['growth_mb']:>14.1f}  "
                      f"{result['error'] or ''}")


if __name__ == "__main__":
    _print_table()
