"""Settings: defaults, environment, overrides, units, and every option documented in the README."""

from __future__ import annotations

from pathlib import Path

import pytest

from visualsearch.errors import ConfigurationError
from visualsearch.settings import SETTINGS_HELP, Settings, parse_size

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_setting_is_documented_in_the_readme():
    readme = README.read_text()
    undocumented = [name for name in SETTINGS_HELP if f"`{name}`" not in readme]
    assert undocumented == []


def test_environment_then_overrides():
    env = {"VISUALSEARCH_DATA_DIR": "/srv/shop", "VISUALSEARCH_BATCH_SIZE": "64",
           "VISUALSEARCH_MAX_UPLOAD_SIZE": "2M", "VISUALSEARCH_ALLOW_DOWNLOAD": "no"}
    settings = Settings.from_env(env, batch_size=8, backbone=None)
    assert settings.data_dir == Path("/srv/shop") and settings.batch_size == 8
    assert settings.max_upload_size == 2 * 1024**2 and settings.allow_download is False
    assert settings.backbone is None and settings.device == "cpu"
    assert settings.catalogue_url == "sqlite:////srv/shop/catalogue.db"
    assert Settings.from_env(env, db_url="postgresql://x/y").catalogue_url == "postgresql://x/y"


def test_bad_values_name_their_source():
    with pytest.raises(ConfigurationError, match="VISUALSEARCH_BATCH_SIZE"):
        Settings.from_env({"VISUALSEARCH_BATCH_SIZE": "many"})
    with pytest.raises(ConfigurationError, match="unknown settings"):
        Settings.from_env({}, colour="red")
    # A vector store address is checked at start-up, not at the first search.
    with pytest.raises(ConfigurationError, match=r"^VISUALSEARCH_VECTOR_STORE: unknown scheme 'redis'"):
        Settings.from_env({"VISUALSEARCH_VECTOR_STORE": "redis://cache:6379"})
    with pytest.raises(ConfigurationError, match=r"^--vector-store: .*neither milvus://"):
        Settings.from_env({}, vector_store="vectors.sqlite")
    assert Settings.from_env({"VISUALSEARCH_VECTOR_STORE": " milvus://db:19530/shop "}).vector_store == \
        "milvus://db:19530/shop"


@pytest.mark.parametrize("text, size", [("512", 512), ("16M", 16 * 1024**2), ("1.5k", 1536),
                                        ("2 GiB", 2 * 1024**3), (100, 100)])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_parse_size_rejects_nonsense():
    with pytest.raises(ConfigurationError):
        parse_size("lots")
