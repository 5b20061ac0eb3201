"""A request's budget: a search's memory and time stay bounded, hostile images included,
and a request over a size limit gets a 413 that names the limit.

A child process loads the backbone and warms up with one ordinary search; then, for
each case, it resets its peak-RSS counter, searches once with the case's file and
reports the error, the seconds and the peak RSS above that idle level (Linux
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

import numpy as np
import pytest
from PIL import Image
from werkzeug.test import EnvironBuilder

from visualsearch.images import DEFAULT_MAX_PIXELS
from visualsearch.service import VisualSearch
from visualsearch.settings import Settings
from web import create_app

from .conftest import REPO, TINY

# A search never uses more than this above idle (the process after loading the model
# and serving one search). The largest image allowed (DEFAULT_MAX_PIXELS) has to be
# decoded whole once, and Pillow keeps RGB and RGBA in 4 bytes a pixel (153 MB at
# 40 MP); RGBA needs a premultiplied copy to be reduced (x2). Everything after that is
# reduced to 3x the model's input on the short side: a few tens of megabytes.
BUDGET_MB = 2 * 4 * DEFAULT_MAX_PIXELS / 2**20 + 64  # 369 MB at 40 MP
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
    "png-6300x6300-16bit": (lambda: _png((6300, 6300), "I;16"), None),
    "png-1414x28280-thin": (lambda: _png((1414, 28_280)), None),
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


def measure_searches(paths: list[str], backbone: str, weights: str | None, data_dir: str) -> list[dict]:
    """In a fresh process: one search per file; each one's error, seconds and peak MB above idle."""
    settings = Settings(data_dir=Path(data_dir), backbone=backbone, weights=weights or None, workers=0)
    vs = VisualSearch(settings)
    vs.search(_png((640, 480)))  # warm-up: model, transform, thread pool, allocator
    return [_measure_one(vs, Path(path).read_bytes()) for path in paths]


def _measure_one(vs, data: bytes) -> dict:
    # "5" resets VmHWM to the current RSS (Linux >= 4.0), so the peak is this search's alone.
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    idle = _memory_mb("VmRSS")
    started = time.perf_counter()
    error = message = None
    try:
        vs.search(data)
    except Exception as exc:  # reported to the parent, which checks the type
        error, message = type(exc).__name__, str(exc)
    seconds = time.perf_counter() - started
    return {"error": error, "message": message, "seconds": round(seconds, 3),
            "growth_mb": round(_memory_mb("VmHWM") - idle, 1), "idle_mb": round(idle, 1)}


def run_in_child(files: dict[str, Path], *, backbone: str, weights: str | None, data_dir: Path) -> dict[str, dict]:
    """Search each file in one fresh process; results by case name."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("measuring peak memory needs Linux's /proc")
    code = ("import json, sys; import tests.conftest; from tests.test_request_budget import measure_searches; "
            "print(json.dumps(measure_searches(sys.argv[4:], *sys.argv[1:4])))")
    args = [backbone, weights or "", str(data_dir), *map(str, files.values())]
    # A fixed mmap threshold hands every large block back to the kernel when it is freed
    # (glibc otherwise raises the threshold and keeps them): one case's leftovers cannot
    # hide the next one's growth, so cases can share a process.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(zip(files, json.loads(done.stdout.strip().splitlines()[-1])))


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    files = {}
    for name, (make, _) in CASES.items():
        files[name] = folder / name
        files[name].write_bytes(make())
    return files


@pytest.fixture(scope="module")
def tiny_results(image_files, tiny_weights, tmp_path_factory) -> dict[str, dict]:
    return run_in_child(image_files, backbone=TINY, weights=str(tiny_weights),
                        data_dir=tmp_path_factory.mktemp("budget-data"))


def test_the_cases_are_what_they_claim(image_files):
    assert image_files["png-100000x1"].stat().st_size < 400
    assert image_files["gif-declaring-10799x1"].stat().st_size < 60
    with Image.open(image_files["png-6300x6300-zeros"]) as zeros:
        assert zeros.size == (6300, 6300) and 6300 * 6300 <= DEFAULT_MAX_PIXELS


def test_cases_are_measured_from_the_same_idle(tiny_results):
    idles = [result["idle_mb"] for result in tiny_results.values()]
    assert max(idles) - min(idles) < 32, tiny_results  # no case's memory lingered into the next


@pytest.mark.parametrize("name", REFUSED)
def test_hostile_images_are_refused_fast_and_small(name, tiny_results):
    result = tiny_results[name]
    assert result["error"] == CASES[name][1] and "differ more than 20:1" in result["message"], result
    assert result["seconds"] < REFUSED_SECONDS and result["growth_mb"] < REFUSED_BUDGET_MB, result


@pytest.mark.parametrize("name", ACCEPTED)
def test_largest_allowed_images_stay_within_the_budget(name, tiny_results):
    result = tiny_results[name]
    assert result["error"] is None and result["growth_mb"] < BUDGET_MB and result["seconds"] < 5, result


@pytest.mark.slow
def test_default_backbone_stays_within_the_budget(image_files, tmp_path):
    results = run_in_child(image_files, backbone="efficientnet_lite0", weights=None, data_dir=tmp_path)
    for name, result in results.items():
        refused = result["error"] is not None
        assert result["error"] == CASES[name][1], (name, result)
        assert result["growth_mb"] < (REFUSED_BUDGET_MB if refused else BUDGET_MB), (name, result)
        assert result["seconds"] < (REFUSED_SECONDS if refused else 20), (name, result)


# --- Request size limits: a 413 names the limit that tripped --------------------------


@pytest.fixture
def client(tiny_settings, small_catalogue):
    VisualSearch(tiny_settings).index(small_catalogue)
    return create_app({"TESTING": True}, settings=tiny_settings).test_client()


def _photo(size: tuple[int, int] = (48, 48)) -> tuple[io.BytesIO, str]:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "PNG")
    buffer.seek(0)
    return buffer, "photo.png"


def _multipart(fields: dict) -> dict:
    """Test-client arguments for a multipart body held in memory: the client spools a body
    over 500 KB to a temporary file that it closes only after following redirects."""
    environ = EnvironBuilder(method="POST", data=fields).get_environ()
    with environ["wsgi.input"] as stream:
        body = stream.read()
    return {"input_stream": io.BytesIO(body), "content_type": environ["CONTENT_TYPE"]}


def _too_large(response) -> str:
    assert response.status_code == 413, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == "too_large"
    return error["message"]


def test_form_limits_are_explicit(client):
    config = client.application.config
    assert config["MAX_FORM_PARTS"] == 100 and config["MAX_FORM_MEMORY_SIZE"] == 128 * 1024


def test_too_many_form_fields_says_so(client):
    fields = {f"attribute{number}": "x" for number in range(5000)}
    message = _too_large(client.post("/api/v1/search", **_multipart({"image": _photo(), **fields})))
    assert message == "too many form fields (files included): the limit is 100"


def test_a_form_field_too_long_says_so(client):
    body = _multipart({"image": _photo(), "category": "x" * 1024**2})
    message = _too_large(client.post("/api/v1/search", **body))
    assert message == "a form field is longer than 131,072 bytes"


@pytest.mark.parametrize("blank_fields, last_field, expected", [
    (99, None, None),  # the photo and 99 fields: 100 parts, the limit
    (100, None, "too many form fields (files included): the limit is 100"),
    (98, "x" * (128 * 1024 + 1), "a form field is longer than 131,072 bytes"),  # the 100th part
])
def test_the_413_names_the_limit_at_its_edge(client, blank_fields, last_field, expected):
    fields = {"image": _photo(), **{f"attribute{number}": "" for number in range(blank_fields)}}
    if last_field is not None:
        fields["last"] = last_field
    response = client.post("/api/v1/search", **_multipart(fields))
    if expected is None:
        assert response.status_code == 200, response.get_json()
    else:
        assert _too_large(response) == expected


def test_an_upload_over_the_content_length_says_so(client):
    client.application.config["MAX_CONTENT_LENGTH"] = 1000
    message = _too_large(client.post("/api/v1/search", data={"image": _photo((300, 300))}))
    assert message == "upload larger than 1,000 bytes"


def test_a_streamed_upload_without_content_length_is_named_as_the_upload(client):
    """gunicorn sets wsgi.input_terminated for chunked requests: werkzeug then limits the
    stream while the form parser reads it, and that 413 must not blame the form."""
    client.application.config["MAX_CONTENT_LENGTH"] = 1000
    chunked = {"HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input_terminated": True}  # no length
    response = client.post("/api/v1/search", **_multipart({"image": _photo((300, 300))}),
                           environ_overrides=chunked)
    assert _too_large(response) == "upload larger than 1,000 bytes"


def test_requests_within_the_limits_still_work(client):
    """A large photo is a file part, not a form field: MAX_FORM_MEMORY_SIZE must not bind it."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (1200, 1200, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    assert buffer.tell() > 4 * 1024**2
    buffer.seek(0)
    fields = {f"attribute{number}": "" for number in range(90)}  # blank filters are ignored
    body = _multipart({"image": (buffer, "noise.png"), "category": "hats", **fields})
    response = client.post("/api/v1/search", **body)
    assert response.status_code == 200, response.get_json()


def _print_table() -> None:  # pragma: no cover - a measuring aid, run by hand
    import tempfile

    import torch

    from .conftest import _TinyNet

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        torch.manual_seed(0)
        torch.save(_TinyNet().state_dict(), root / "tiny.pth")
        files = {}
        for name, (make, _) in CASES.items():
            files[name] = root / name
            files[name].write_bytes(make())
        print(f"{'backbone':<20} {'case':<26} {'bytes':>8} {'seconds':>8} {'MB above idle':>14}  error")
        for backbone, weights in ((TINY, str(root / "tiny.pth")), ("efficientnet_lite0", None)):
            results = run_in_child(files, backbone=backbone, weights=weights, data_dir=root / backbone)
            for name, result in results.items():
                print(f"{backbone:<20} {name:<26} {files[name].stat().st_size:>8} {result['seconds']:>8.3f} "
                      f"{result['growth_mb']:>14.1f}  {result['error'] or ''}")
        print(f"budget: {BUDGET_MB:.0f} MB above idle; refused files: under {REFUSED_BUDGET_MB} MB "
              f"and {REFUSED_SECONDS} s")


if __name__ == "__main__":
    _print_table()
