"""The catalogue database itself: migrations, cross-host locks, counters under concurrent
writers, and the errors a server database gives, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from dataclasses import replace

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from visualsearch.catalogue import NoCatalogueError, counters, open_catalogue, schema
from visualsearch.catalogue import store as catalogue
from visualsearch.catalogue.locks import INDEX_LOCK, VECTOR_COMMIT_LOCK, advisory_key, catalogue_lock, lock_file
from visualsearch.catalogue.migrations import baseline_triggers
from visualsearch.catalogue.models import Base, ImageStatus
from visualsearch.catalogue_manifest import ProductRecord
from visualsearch.errors import ConfigurationError, StorageBusyError, StorageError, WriterBusyError
from visualsearch.service import VisualSearch
from visualsearch.storage_errors import storage_error_from
from visualsearch.sync import plan_for_settings

from .conftest import REPO, TINY, cli_runner, make_image, write_catalogue
from .milvus_server import milvus_server  # noqa: F401 (a fixture)

pytestmark = pytest.mark.catalogue_databases("sqlite", "postgresql")


@pytest.fixture
def url(catalogue_db, tmp_path, request):
    """An empty catalogue database: a new SQLite file, or a PostgreSQL database with nothing in it."""
    if catalogue_db is None:
        yield f"sqlite:///{tmp_path / 'catalogue.db'}"
        return
    server = request.getfixturevalue("postgres_server")
    empty = server.new_database(migrated=False)
    yield empty
    server.drop_database(empty)


def _empty_database(url: str) -> None:
    """Drop the catalogue from a migrated test database."""
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        for table in ("product_images", "products", "catalogue_meta", "catalogue_counts",
                      "catalogue_count_deltas", "projections", "alembic_version"):
            connection.exec_driver_sql(f"DROP TABLE {table} CASCADE")
        for function in ("vs_count_images()", "vs_count_products()", "vs_count_bump(text, bigint)"):
            connection.exec_driver_sql(f"DROP FUNCTION {function}")
    engine.dispose()


def _engine(sessions) -> sa.Engine:
    return sessions.kw["bind"]


# --- migrations -------------------------------------------------------------------------


def test_a_fresh_database_is_migrated_to_the_head_and_matches_the_models(url):
    sessions = open_catalogue(url)
    with _engine(sessions).connect() as connection:
        assert schema.current_revision(connection) == schema.head_revision()
        # The migrations create exactly what the models describe (tables, columns, indexes).
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    with sessions() as session:
        assert catalogue.catalogue_counts(session).products == 0


def test_a_second_open_is_a_no_op(url, monkeypatch):
    open_catalogue(url)

    def refuse(*args, **kwargs):
        raise AssertionError("a catalogue at the head was migrated again")

    monkeypatch.setattr(schema.command, "upgrade", refuse)
    monkeypatch.setattr(schema.command, "stamp", refuse)
    open_catalogue(url)


def test_concurrent_first_opens_in_several_processes(url):
    code = f"from visualsearch.catalogue import open_catalogue; open_catalogue({url!r}); print('ok')"
    processes = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0 and out.strip() == "ok", err
    sessions = open_catalogue(url)
    with _engine(sessions).connect() as connection:
        assert schema.current_revision(connection) == schema.head_revision()


def test_read_only_opens_never_migrate(url, catalogue_db):
    if catalogue_db is None:
        pytest.skip("an SQLite catalogue's absence is checked by its file (test_storage_faults)")
    with pytest.raises(NoCatalogueError, match="no catalogue in database"):
        open_catalogue(url, read_only=True)
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        assert not sa.inspect(connection).has_table("products")
    engine.dispose()


def test_a_catalogue_at_the_baseline_gains_the_projections_table_and_keeps_its_rows(url):
    """A catalogue migrated before revision 0002 (as every existing one is) is upgraded in place."""
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        command.upgrade(schema.alembic_config(connection), schema.BASELINE_REVISION)
        connection.commit()
        assert schema.current_revision(connection) == "0001"
        assert not sa.inspect(connection).has_table("projections")
    with engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO catalogue_meta VALUES ('backbone', 'test_tiny')"))
    engine.dispose()

    sessions = open_catalogue(url)
    with _engine(sessions).connect() as connection:
        assert schema.current_revision(connection) == schema.head_revision()
        assert sa.inspect(connection).has_table("projections")
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    with sessions() as session:
        assert catalogue.get_meta(session, "backbone") == "test_tiny"
        sha256 = catalogue.store_projection(session, b"\x00projection bytes\xff")
        assert catalogue.store_projection(session, b"\x00projection bytes\xff") == sha256  # once per content
        session.commit()
    with sessions() as session:
        assert catalogue.projection_bytes(session, sha256) == b"\x00projection bytes\xff"
        assert catalogue.projection_bytes(session, "0" * 64) is None


def _words(sql: str) -> str:
    return " ".join(sql.split())


@pytest.mark.catalogue_databases("sqlite")
def test_the_migrated_triggers_are_the_ones_counters_reads_today():
    """Revision 0001 keeps a frozen copy of the counting triggers; the counters module
    holds the current definitions. A divergence must be a deliberate new revision
    (then compare that revision's copy here instead)."""
    for frozen, current in ((baseline_triggers.SQLITE_TRIGGERS, counters.SQLITE_TRIGGERS),
                            (baseline_triggers.POSTGRESQL_FUNCTIONS, counters.POSTGRESQL_FUNCTIONS),
                            (baseline_triggers.POSTGRESQL_TRIGGERS, counters.POSTGRESQL_TRIGGERS)):
        assert {name: _words(sql) for name, sql in frozen.items()} == \
            {name: _words(sql) for name, sql in current.items()}
    assert set(baseline_triggers.POSTGRESQL_TRIGGER_TABLES) == set(counters.POSTGRESQL_TRIGGERS)


def test_a_migrated_database_has_the_counting_triggers(url):
    open_catalogue(url)
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            rows = connection.execute(sa.text("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"))
            installed = {name: sql for name, sql in rows}
            assert {name: _words(sql) for name, sql in installed.items()} == {
                name: _words(f"CREATE TRIGGER {name} {sql}") for name, sql in counters.SQLITE_TRIGGERS.items()}
        else:
            installed = set(connection.scalars(sa.text("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")))
            assert installed == set(counters.POSTGRESQL_TRIGGERS)
            rows = connection.execute(sa.text("SELECT proname, prosrc FROM pg_proc WHERE proname LIKE 'vs_count%'"))
            assert {name: _words(source) for name, source in rows} == {
                signature.partition("(")[0]: _words(body.split("$$")[1])
                for signature, body in counters.POSTGRESQL_FUNCTIONS.items()}
    engine.dispose()


@pytest.mark.catalogue_databases("sqlite")
def test_a_catalogue_made_before_migrations_is_stamped_and_keeps_its_rows(tmp_path):
    """The old open path: create_all and the triggers, no alembic_version; that catalogue
    also predates product_images.source_etag and the upload-path index."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        Base.metadata.create_all(connection, tables=[Base.metadata.tables["products"],
                                                     Base.metadata.tables["catalogue_meta"],
                                                     Base.metadata.tables["catalogue_counts"]])
        connection.exec_driver_sql(
            "CREATE TABLE product_images (id INTEGER NOT NULL, product_id INTEGER NOT NULL, "
            "position INTEGER NOT NULL, path TEXT NOT NULL, sha256 VARCHAR(64), file_size BIGINT, "
            "file_mtime_ns BIGINT, width INTEGER, height INTEGER, status VARCHAR(16) NOT NULL, error TEXT, "
            "indexed_at DATETIME, PRIMARY KEY (id), CONSTRAINT uq_product_image_path UNIQUE (product_id, path), "
            "FOREIGN KEY(product_id) REFERENCES products (id) ON DELETE CASCADE)")
        for column in ("product_id", "sha256"):
            connection.exec_driver_sql(f"CREATE INDEX ix_product_images_{column} ON product_images ({column})")
        baseline_triggers.install_triggers(connection)  # (what the old open path installed)
        connection.exec_driver_sql(
            "INSERT INTO products (id, sku, title, category, attributes, vectors_stale, created_at, updated_at) "
            "VALUES (1, 'OLD-1', 'Old', 'shoes', '{}', 0, '2024-01-01', '2024-01-01')")
        connection.exec_driver_sql("INSERT INTO product_images (product_id, position, path, status) "
                                   "VALUES (1, 0, '/x/a.png', 'indexed')")
        connection.exec_driver_sql("INSERT INTO catalogue_meta VALUES ('backbone', 'test_tiny')")
    engine.dispose()

    sessions = open_catalogue(url)
    with _engine(sessions).connect() as connection:
        assert schema.current_revision(connection) == schema.head_revision()
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    with sessions() as session:
        product = catalogue.get_product(session, "OLD-1")
        assert product.title == "Old" and [image.path for image in product.images] == ["/x/a.png"]
        assert catalogue.get_meta(session, "backbone") == "test_tiny"
        counts = catalogue.catalogue_counts(session)
        assert (counts.products, counts.indexed, counts.categories) == (1, 1, {"shoes": 1})


# --- catalogue_meta ---------------------------------------------------------------------


def test_set_meta_is_read_back_in_the_same_session(url):
    sessions = open_catalogue(url)
    with sessions() as session:
        catalogue.set_meta(session, "backbone", "first")
        assert catalogue.get_meta(session, "backbone") == "first"
        catalogue.set_meta(session, "backbone", "second")
        assert catalogue.get_meta(session, "backbone") == "second"
        session.commit()
    with sessions() as session:
        assert catalogue.get_meta(session, "backbone") == "second"


@pytest.mark.catalogue_databases("postgresql")
def test_two_writers_setting_one_key_at_once_both_succeed(url, catalogue_db):
    """Two replicas claiming the identity of a new catalogue together: both read the key
    absent, both write it; neither gets a unique violation (the later value wins)."""
    sessions = open_catalogue(url)
    both_read = threading.Barrier(2)
    errors: list[BaseException] = []

    def claim(value: str) -> None:
        try:
            with sessions() as session:
                assert catalogue.get_meta(session, "backbone") is None
                both_read.wait(timeout=10)
                catalogue.set_meta(session, "backbone", value)
                session.commit()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(value,)) for value in ("one", "two")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    with sessions() as session:
        assert catalogue.get_meta(session, "backbone") in ("one", "two")


# --- locks ------------------------------------------------------------------------------


def _lock(sessions, tmp_path, name=INDEX_LOCK, timeout=0.0):
    return catalogue_lock(sessions, name, data_dir=tmp_path, timeout=timeout, busy_message=f"{name} is busy")


def test_a_second_holder_is_refused_until_the_first_lets_go(tiny_settings, tmp_path):
    sessions = VisualSearch(tiny_settings).sessions
    other = open_catalogue(tiny_settings.catalogue_url)  # another pool: another connection
    with _lock(sessions, tmp_path):
        with pytest.raises(WriterBusyError, match="index is busy"):
            with _lock(other, tmp_path, timeout=0.3):
                pass
        with _lock(other, tmp_path, name=VECTOR_COMMIT_LOCK):  # another name: independent
            pass
    with _lock(other, tmp_path):
        pass


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from visualsearch.catalogue import open_catalogue
    from visualsearch.catalogue.locks import catalogue_lock
    with catalogue_lock(open_catalogue({url!r}), "index", data_dir=Path({data_dir!r}), timeout=0, busy_message="busy"):
        print("held", flush=True)
        time.sleep(600)
""")


def test_a_lock_held_by_another_process_is_released_when_it_dies(tiny_settings, tmp_path):
    """Another process holds the index lock; a batch run here is refused; once the holder
    is killed, the run goes ahead. On PostgreSQL the holder has a data directory of its
    own, as another host would: a file lock there would guard nothing here."""
    VisualSearch(tiny_settings)
    on_server = tiny_settings.db_url is not None
    holder_dir = tmp_path / "other-host" if on_server else tiny_settings.data_dir
    holder_dir.mkdir(exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(url=tiny_settings.catalogue_url,
                                                                   data_dir=str(holder_dir))],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        vs = VisualSearch(tiny_settings)
        with pytest.raises(WriterBusyError, match="another 'visualsearch index' run"):
            with vs.index_lock(wait=0.3):
                pass
        if on_server:  # (refused by the server's advisory lock: no lock file on either side)
            assert not lock_file(holder_dir, INDEX_LOCK).exists()
            assert not lock_file(tiny_settings.data_dir, INDEX_LOCK).exists()
    finally:
        holder.kill()
        holder.communicate()
    with vs.index_lock(wait=10):
        pass


@pytest.mark.catalogue_databases("postgresql")
def test_a_lock_whose_connection_died_is_known_lost(tiny_settings, tmp_path, caplog):
    """The server ends the holder's session (as after a dropped connection): another
    writer may take the lock, the holder's check says so, and its release logs it."""
    sessions = VisualSearch(tiny_settings).sessions
    other = open_catalogue(tiny_settings.catalogue_url)
    with _lock(sessions, tmp_path) as held:
        held.check()
        with _engine(other).connect() as connection:
            connection.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"))
            connection.commit()
        with _lock(other, tmp_path, timeout=10):  # free for another writer now
            pass
        with pytest.raises(StorageError, match="connection holding lock 'index' was lost"):
            held.check()
    assert "catalogue lock 'index' was lost while held" in caplog.text
    with _lock(sessions, tmp_path):  # the dead connection went back to no pool
        pass


@pytest.mark.catalogue_databases("postgresql")
def test_hosts_sharing_a_catalogue_and_a_milvus_server_take_turns_writing_vectors(
        tiny_settings, small_catalogue, tmp_path, milvus_server):  # noqa: F811 (the fixture)
    """Two hosts (data directories of their own, nothing shared on disk) writing one Milvus
    collection: the commit lock is the catalogue's advisory lock, not a file of either."""
    one = replace(tiny_settings, vector_store=f"{milvus_server}/turns", data_dir=tmp_path / "host-a")
    VisualSearch(one).index(small_catalogue)
    first = VisualSearch(one)
    second = VisualSearch(replace(one, data_dir=tmp_path / "host-b"))
    with first.writable_store().writing():
        with pytest.raises(WriterBusyError):
            with second.writable_store().writing(timeout=0.5):
                pass
    with second.writable_store().writing(timeout=0.5):
        with pytest.raises(WriterBusyError):
            with first.writable_store().writing(timeout=0.5):
                pass
    assert second.remove(["P1"]).removed == ["P1"]  # a write through the second host
    assert "P1" not in [hit.sku for hit in first.similar("P2", top_k=24).hits]


@pytest.mark.catalogue_databases("postgresql")
def test_server_connections_send_tcp_keepalives(tiny_settings):
    """A connection holding an advisory lock sits idle: keepalives notice its death."""
    engine = _engine(open_catalogue(tiny_settings.catalogue_url))
    with engine.connect() as connection:
        parameters = connection.connection.dbapi_connection.info.get_parameters()
    engine.dispose()
    assert {name: parameters.get(name) for name in ("keepalives", "keepalives_idle", "keepalives_interval",
                                                     "keepalives_count")} == \
        {"keepalives": "1", "keepalives_idle": "30", "keepalives_interval": "10", "keepalives_count": "3"}


def test_advisory_keys_are_stable_64_bit_integers():
    assert advisory_key("index") == advisory_key("index") != advisory_key(VECTOR_COMMIT_LOCK)
    assert -2**63 <= advisory_key("index") < 2**63


# --- counters under concurrent writers -----------------------------------------------


def test_counters_stay_exact_under_concurrent_writers(tiny_settings, monkeypatch):
    monkeypatch.setattr(counters, "FOLD_THRESHOLD", 5)  # fold often, while writers write
    sessions = VisualSearch(tiny_settings).sessions
    errors = []

    def writer(prefix: str) -> None:
        try:
            for number in range(15):
                with sessions.begin() as session:
                    record = ProductRecord(sku=f"{prefix}{number}", category=["a", "b"][number % 2],
                                           images=[f"/img/{prefix}{number}-{view}.png" for view in range(2)])
                    catalogue.upsert_products(session, [record])
                with sessions.begin() as session:
                    images = catalogue.images_of_products(session, [catalogue.get_product(session, record.sku).id])
                    catalogue.mark_indexed(session, [{"id": image.id, "sha256": "0" * 64, "file_size": 1,
                                                      "file_mtime_ns": 1, "width": 1, "height": 1}
                                                     for image in images[:1]])
                with sessions() as session:
                    catalogue.catalogue_counts(session)  # (reads fold the deltas meanwhile)
            with sessions.begin() as session:
                catalogue.upsert_products(session, [ProductRecord(sku=f"{prefix}0", category="c")])
                catalogue.delete_products(session, [f"{prefix}1"])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(prefix,)) for prefix in "XYZ"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with sessions() as session:
        counted = {key: value for key, value in counters.read_counts(session).items() if value}
    with sessions.begin() as session:
        counters.recount(session.connection())
    with sessions() as session:
        assert counted == {key: value for key, value in counters.read_counts(session).items() if value}
    assert counted["products"] == 42 and counted["images:indexed"] == 42 and counted["category:c"] == 3


def test_an_upsert_merges_a_sku_named_twice_into_a_copy_and_hands_back_unchanged_images(tiny_settings):
    """A chunk naming a SKU twice is merged without changing the caller's records; an
    upsert that adds no image returns the products' image rows (the indexer then reads
    them once), as images_of_products gives them."""
    sessions = VisualSearch(tiny_settings).sessions
    first = ProductRecord(sku="A", title="Tee", images=["/img/a1.png"])
    second = ProductRecord(sku="A", category="Shirts", images=["/img/a2.png", "/img/a1.png"])
    with sessions.begin() as session:
        added = catalogue.upsert_products(session, [first, second, ProductRecord(sku="B", images=["/img/b.png"])])
    assert added.images is None, "images were added: their ids are read afterwards"
    assert (first.category, first.images, second.title) == (None, ["/img/a1.png"], None)
    with sessions.begin() as session:
        again = catalogue.upsert_products(session, [ProductRecord(sku="B"), ProductRecord(sku="A", price=3.0)])
        stored = catalogue.images_of_products(session, [added.product_ids["A"], added.product_ids["B"]])
        product = catalogue.get_product(session, "A")
        fields = (product.title, product.category, product.price)
    assert again.images == stored
    assert [image.path for image in stored] == ["/img/a1.png", "/img/a2.png", "/img/b.png"]
    assert all(image.status is ImageStatus.PENDING for image in stored)
    assert fields == ("Tee", "Shirts", 3.0)


# --- errors and the command line -------------------------------------------------------


@pytest.mark.catalogue_databases("postgresql")
def test_an_unreachable_server_says_what_to_do(catalogue_db):
    with pytest.raises(ConfigurationError, match=r"cannot reach PostgreSQL at 127\.0\.0\.1:1 .*is the server running"):
        open_catalogue("postgresql+psycopg://nobody:secret@127.0.0.1:1/shop")
    with pytest.raises(ConfigurationError) as caught:
        open_catalogue("postgresql+psycopg://nobody:secret@127.0.0.1:1/shop")
    assert "secret" not in str(caught.value)


def test_server_errors_become_typed_storage_errors():
    class Deadlock(Exception):
        sqlstate = "40P01"

    class AdminShutdown(Exception):
        sqlstate = "57P01"

    assert isinstance(storage_error_from(sa.exc.OperationalError("x", {}, Deadlock()), REPO), StorageBusyError)
    assert type(storage_error_from(sa.exc.OperationalError("x", {}, AdminShutdown()), REPO)) is StorageError

    class UniqueViolation(Exception):
        sqlstate = "23505"

    assert storage_error_from(sa.exc.IntegrityError("x", {}, UniqueViolation()), REPO) is None

    class InvalidPassword(Exception):  # class 28: the password was rotated under a running app
        sqlstate = "28P01"

        def __str__(self):
            return 'password authentication failed for user "shop"'

    refused = storage_error_from(sa.exc.OperationalError("x", {}, InvalidPassword()), REPO)
    assert type(refused) is StorageError and "password authentication failed" in str(refused)


@pytest.mark.catalogue_databases("postgresql")
def test_a_plan_against_a_database_with_no_catalogue_yet(tiny_settings, small_catalogue):
    _empty_database(tiny_settings.db_url)
    plan = plan_for_settings(tiny_settings, small_catalogue)
    assert plan.products.add == 12


def test_cli_index_and_search_with_db(tiny_settings, tiny_weights, tmp_path, monkeypatch):
    folder = tmp_path / "shop"
    (folder / "img").mkdir(parents=True)
    rows = [{"sku": f"S{n}", "image": f"img/s{n}.png", "category": "tops"} for n in range(4)]
    for n in range(4):
        make_image(folder / "img" / f"s{n}.png", seed=600 + n)
    manifest = write_catalogue(folder, rows)
    run = cli_runner(monkeypatch, tmp_path / "cli-data", tiny_weights, backbone=TINY)
    db = ["--db", tiny_settings.catalogue_url]
    result = run("index", manifest, *db)
    assert result.exit_code == 0, result.output
    result = run("search", folder / "img" / "s2.png", "--top-k", "1", "--json", *db)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["results"][0]["sku"] == "S2"
    stats = json.loads(run("stats", "--json", *db).output)
    assert (stats["products"], stats["indexed_images"], stats["categories"]) == (4, 4, {"tops": 4})
