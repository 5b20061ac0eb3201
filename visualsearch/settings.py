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


def _parse_optional_int(text: str | int | None) -> int | None:
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigurationError(f"not a whole number: {text!r}") from None


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
    backbone: str | None = _opt(None,
                                "Registered backbone name. Default: the one the data directory was "
                                "indexed with, or efficientnet_lite0 for a new one.")
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
