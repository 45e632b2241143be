"""Shared fixtures. Every broker here is a private Mosquitto on a free loopback port."""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from simulator.mosquitto import MosquittoBroker

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CORPUS = SHARED / "corpus"
CORPUS_ENV = "ADDIN_CORPUS"
"""Names another corpus folder (the one holding manifests/real) instead of ../shared/corpus."""


def corpus_root() -> Path:
    return Path(os.environ[CORPUS_ENV]) if os.environ.get(CORPUS_ENV) else CORPUS


def corpus_missing_reason(path: Path) -> str:
    """The skip reason of every corpus test: what the corpus is and where it goes."""
    return (
        "needs the published-manifest corpus (297 Office add-in manifests from Microsoft's "
        "OfficeDev GitHub repositories, kept outside this repository; see docs/conformance.md): "
        f"none at {path}; put it at ../shared/corpus next to this checkout, or set "
        f"{CORPUS_ENV}=DIR (the folder holding manifests/real)"
    )


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., MosquittoBroker]]:
    """Make brokers with options (password_file, acl_file, persistence, port...); all are
    killed after the test."""
    made: list[MosquittoBroker] = []

    def make(start: bool = True, **options: Any) -> MosquittoBroker:
        b = MosquittoBroker(tmp_path / f"broker{len(made)}", **options)
        made.append(b)
        if start:
            b.start()
        return b

    yield make
    for b in made:
        b.kill()


@pytest.fixture
def broker(broker_factory: Callable[..., MosquittoBroker]) -> MosquittoBroker:
    """A running anonymous broker without persistence."""
    return broker_factory()


@pytest.fixture
def corpus_dir() -> Path:
    path = corpus_root() / "manifests" / "real"
    if not path.is_dir():
        pytest.skip(corpus_missing_reason(path))
    return path


PG_ENV = "ADDIN_TEST_POSTGRES"
"""The PostgreSQL server the backend tests make their databases on (a URL of a database the
user may CREATE DATABASE from); default the local one with trust auth."""
PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"


def postgres_admin_url() -> str:
    return os.environ.get(PG_ENV) or PG_DEFAULT


@functools.cache
def postgres_unavailable() -> str | None:
    """Why no PostgreSQL database can be made for a test (None: one can)."""
    try:
        import psycopg
    except ImportError:
        return "needs psycopg (the server extra: pip install -e '.[test]')"
    url = postgres_admin_url()
    try:
        psycopg.connect(url, connect_timeout=3, autocommit=True).close()
    except psycopg.Error as e:
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return (
            f"needs PostgreSQL at {url} ({cause}); start it (`pg_ctlcluster "
            "--skip-systemctl-redirect <version> main start`, scripts/bootstrap.sh installs "
            f"it) or set {PG_ENV}=URL"
        )
    return None


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database with a random name; its URL. Dropped after."""
    import secrets

    import psycopg

    why = postgres_unavailable()
    if why is not None:
        pytest.skip(why)
    admin = postgres_admin_url()
    name = f"addin_test_{secrets.token_hex(6)}"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = admin.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)]


@pytest.fixture(params=BACKENDS)
def db_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The server's database for a test, once per backend: an SQLite file in the test's
    folder, or a PostgreSQL database of its own (skipped, saying why, without one)."""
    if request.param == "sqlite":
        yield str(tmp_path / "server.db")
        return
    with postgres_database() as url:
        yield url


@pytest.fixture
async def service(db_target: str) -> AsyncIterator[Any]:
    """The server's service layer on a fresh database of each backend, tenant contoso."""
    from server_stub import db
    from server_stub.service import Service

    database = await db.Database.open(db_target)
    await database.bind_tenant("contoso")
    yield Service(database, "contoso")
    await database.close()
