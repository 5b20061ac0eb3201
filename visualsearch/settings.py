"""One frozen settings object: every option's default, environment variable and help text.

The CLI and the web app build it once, at their edge, from flags and the environment;
the library only ever reads it. The README's option table is checked against
``SETTINGS_HELP`` by a test, so an undocumented option fails the suite.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigurationError
from .images import DEFAULT_MAX_PIXELS
from .remote_images import DEFAULT_REMOTE_PORTS, IPNetwork, parse_allowed_networks, parse_ports

ENV_PREFIX = "VISUALSEARCH_"

_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2,
               "MIB": 1024**2, "G": 1024**3, "GB": 1024**3, "GIB": 1024**3}


def parse_size(text: str | int) -> int:
    """``"16M"``, ``"512k"``, ``"1GiB"`` or a plain number of bytes -> bytes.

    Raises:
        ConfigurationError: not a size.
    """
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ConfigurationError(f"not a size: {text!r} (examples: 16M, 512K, 1G)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


_TIME_UNITS = {"": 1.0, "S": 1.0, "MS": 0.001, "M": 60.0, "MIN": 60.0, "H": 3600.0, "D": 86400.0}


def parse_seconds(text: str | float) -> float:
    """``"250ms"``, ``"5s"``, ``"2m"``, ``"24h"``, ``"7d"`` or a plain number of seconds -> seconds.

    Raises:
        ConfigurationError: not a duration.
    """
    if isinstance(text, (int, float)):
        return float(text)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _TIME_UNITS:
        raise ConfigurationError(f"not a duration: {text!r} (examples: 5s, 250ms, 2m)")
    return float(match.group(1)) * _TIME_UNITS[match.group(2).upper()]


def _opt(default: Any, help: str, parse=None) -> Any:
    return field(default=default, metadata={"help": help, "parse": parse})


def _parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ConfigurationError(f"not a yes/no value: {text!r}")


_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _parse_origins(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"https://shop.example, http://localhost:3000"`` -> exact origins as browsers send them
    in ``Origin`` (lower case, no default port, no path); ``"*"`` stands for any origin."""
    items = text.split(",") if isinstance(text, str) else list(text)
    origins = []
    for item in (item.strip() for item in items):
        if not item:
            continue
        if item == "*":
            origins.append(item)
            continue
        match = re.fullmatch(r"(https?)://([a-z0-9.\-]+|\[[0-9a-f:.]+\])(?::(\d{1,5}))?/?", item.lower())
        if not match:
            raise ConfigurationError(f"not an origin: {item!r} (examples: https://shop.example.com, "
                                     "http://localhost:3000, or * for any)")
        scheme, host, port = match.groups()
        origins.append(f"{scheme}://{host}" + (f":{port}" if port and port != _DEFAULT_PORTS[scheme] else ""))
    return tuple(dict.fromkeys(origins))


def _parse_optional_int(text: str | int | None) -> int | None:
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigurationError(f"not a whole number: {text!r}") from None


def _parse_vector_store(text: str) -> str:
    """Checked at start-up, so that a typo fails the server's start, not its first search."""
    from .vectors.milvus_store import parse_vector_store

    try:
        parse_vector_store(text)
    except ConfigurationError as exc:  # (from_env names the variable or flag itself)
        raise ConfigurationError(str(exc).removeprefix("VISUALSEARCH_VECTOR_STORE: ")) from None
    return text.strip()


def _parse_int(text: str | int) -> int:
    value = _parse_optional_int(text)
    if value is None:
        raise ConfigurationError("a whole number is required")
    return value


def _at_least(minimum: int, parse=_parse_int):
    def parse_bounded(text):
        value = parse(text)
        if value is not None and value < minimum:
            raise ConfigurationError(f"must be at least {minimum}, got {value}")
        return value

    return parse_bounded


@dataclass(frozen=True)
class Settings:
    """Configuration of one deployment. Build with :meth:`from_env`."""

    data_dir: Path = _opt(Path("visualsearch-data"),
                          "Folder holding the catalogue database, the vector index and its manifest.",
                          Path)
    db_url: str | None = _opt(None,
                              "SQLAlchemy URL of the catalogue database (e.g. postgresql://...); "
                              "default: SQLite file catalogue.db in the data directory.")
    vector_store: str | None = _opt(None,
                                    "Where the vectors live. Default: the embedded FAISS store in the data "
                                    "directory. milvus://HOST:PORT/COLLECTION for a Milvus server (shared by "
                                    "replicas on several hosts; needs the milvus extra), or a Milvus Lite file "
                                    "path ending in .db for one machine.", _parse_vector_store)
    uploads: str | None = _opt(None,
                               "Where images sent with API PUTs are kept: a directory shared by all replicas "
                               "(e.g. an NFS mount), or an fsspec URL (s3://bucket/prefix, with fsspec and the "
                               "store's package installed). Default: DATA_DIR/uploads.")
    backbone: str | None = _opt(None,
                                "Registered backbone name. Default: the one the data directory was "
                                "indexed with, or efficientnet_lite0 for a new one.")
    recipe: str | None = _opt(None,
                              "Registered embedding recipe (input size and resize, GeM p, flip and scale "
                              "averaging, projection; `visualsearch recipes`). Default: the one the data "
                              "directory was indexed with, or the backbone's own.")
    weights: str | None = _opt(None, "Path of the backbone's weights file, instead of the packaged "
                                     "file or the torch hub cache.")
    allow_download: bool = _opt(True, "Let torch.hub download missing torchvision weights.", _parse_bool)
    device: str = _opt("cpu", "Where the CNN runs: cpu, cuda, cuda:N or auto (CUDA when present).")
    # Each process running the CNN takes this many cores: N gunicorn workers at PyTorch's
    # default (one thread per core each) ran ~25x slower than at their share of the cores.
    threads: int | None = _opt(None, "CPU threads for the CNN (default: PyTorch's choice, one per core; "
                                     "gunicorn.conf.py gives each gunicorn worker cores // workers).",
                               _at_least(1, _parse_optional_int))
    batch_size: int = _opt(16, "Images per CNN batch while indexing (CPU is fastest at 8-16; on a GPU use 128+).",
                           _at_least(1))
    # Decoding is ~10 % of the work: on 2 cores extra processes only steal the CNN's
    # cores (docs/performance.md), so they start paying from 4 cores up.
    workers: int = _opt(max(0, min(4, ((os.cpu_count() or 2) - 2) // 2)),
                        "Processes that read and decode images while indexing (0: in the main process).",
                        _at_least(0))
    max_image_pixels: int = _opt(DEFAULT_MAX_PIXELS, "Images with more pixels are refused (decompression bombs).",
                                 _at_least(1))
    max_upload_size: int = _opt(16 * 1024**2, "Largest accepted upload, e.g. 16M; larger requests get 413.",
                                _at_least(1, parse_size))
    index_memory: int = _opt(4 * 1024**3, "Memory the vector index's compressed codes may take, e.g. 4G; the "
                                          "index planner picks the index type to fit it.", _at_least(1, parse_size))
    api_key: str | None = _opt(None, "Bearer key for the API's write endpoints (PUT/DELETE a product); "
                                     "unset: they answer 403.")
    # Image URLs (manifests, API image_url): limits of each fetch; the body is capped
    # at max_upload_size like an upload.
    remote_timeout: float = _opt(5.0, "Seconds to wait for an image URL's server to accept the connection, "
                                      "and for each read, e.g. 5s or 500ms.", _at_least(0.001, parse_seconds))
    remote_deadline: float = _opt(15.0, "Seconds one image URL's fetch may take in all, redirects included.",
                                  _at_least(0.001, parse_seconds))
    remote_concurrency: int = _opt(16, "Image URLs fetched at once while indexing.", _at_least(1))
    remote_per_host: int = _opt(4, "Image URLs fetched at once from one host while indexing.", _at_least(1))
    # Shop CDNs version image URLs (Shopify's ?v=), so a changed image nearly always
    # comes under a new URL, which is always fetched: re-asking every URL every night
    # costs a request per image for almost nothing.
    remote_recheck: float = _opt(7 * 86400.0, "How long an indexed image URL, once fetched or answered 304, is "
                                              "counted unchanged without asking its server again, e.g. 7d, 24h "
                                              "(each URL waits 1 to 2 times this, spread so that a catalogue's "
                                              "URLs do not all come due on one night); 0: ask on every index "
                                              "run (index --recheck-urls forces it once).",
                                 _at_least(0, parse_seconds))
    remote_api_concurrency: int = _opt(4, "Image URLs the search API fetches at once in one process; a search "
                                          "by image_url past it answers 503 remote_fetch_busy.", _at_least(1))
    remote_ports: tuple[int, ...] = _opt(DEFAULT_REMOTE_PORTS, "Comma-separated ports image URLs at public "
                                                               "addresses may use (80,443); non-public ones allowed by "
                                                               "VISUALSEARCH_ALLOW_PRIVATE_URLS may use any.",
                                         parse_ports)
    allow_private_urls: tuple[IPNetwork, ...] = _opt(
        (), "Image URLs may reach non-public addresses, on any port: true for any private or loopback one, "
            "or a comma-separated list of addresses and networks (127.0.0.1,10.0.0.0/8). Default: public "
            "addresses only. Cloud metadata and link-local addresses are always refused.", parse_allowed_networks)
    cors_origins: tuple[str, ...] = _opt((), "Comma-separated origins (https://shop.example.com) whose pages may "
                                             "call the read API (search, similar, product, health, openapi) "
                                             "from the browser, as the storefront widget does; * for any; "
                                             "empty: none (CORS off). Never the write endpoints.",
                                         _parse_origins)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Defaults, then ``VISUALSEARCH_*`` variables, then ``overrides`` (``None`` = not given).

        Raises:
            ConfigurationError: a value cannot be parsed; the message names the variable.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for spec in fields(cls):
            env_name = ENV_PREFIX + spec.name.upper()
            raw = overrides.get(spec.name)
            source = f"--{spec.name.replace('_', '-')}"
            if raw is None and env_name in environ:
                raw, source = environ[env_name], env_name
            if raw is None:
                continue
            parse = spec.metadata.get("parse")
            try:
                values[spec.name] = parse(raw) if parse else raw
            except ConfigurationError as exc:
                raise ConfigurationError(f"{source}: {exc}") from None
        unknown = set(overrides) - {spec.name for spec in fields(cls)}
        if unknown:
            raise ConfigurationError(f"unknown settings: {', '.join(sorted(unknown))}")
        return cls(**values)

    def with_overrides(self, **changes: Any) -> "Settings":
        """A copy with ``changes`` applied (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def catalogue_url(self) -> str:
        """The database URL actually used."""
        return self.db_url or f"sqlite:///{(self.data_dir / 'catalogue.db').resolve()}"


SETTINGS_HELP: dict[str, str] = {
    ENV_PREFIX + spec.name.upper(): spec.metadata["help"] for spec in fields(Settings)
}
