"""pytest fixtures for a real PostgreSQL server (the stand-in for QuestDB's PG wire).

Loaded as a plugin from ``tests/conftest.py`` (``pytest_plugins = ["tests.support.pg_fixtures"]``).

* ``pg_template`` (session): one ``initdb``'d, shut-down data directory, made once per
  session (about a second).
* ``pg_server`` (function): a running :class:`EmbeddedPostgres` on ``127.0.0.1`` and a free
  port, on a fresh copy of the template (about a quarter of a second). The test may stop it,
  kill -9 it and start it again (same port); afterwards it is closed and its data deleted, so
  every test gets its own running server.
* ``pg_dsn``: ``pg_server.dsn`` (``postgresql://postgres:<password>@127.0.0.1:<port>/postgres``).
* ``pg_server_factory``: a callable making more servers like ``pg_server``.

The servers need a password over TCP (``PG_TEST_PASSWORD``), like a real QuestDB does, so the
DSN carries credentials and tests can check that they never leak into messages.

Nothing here skips: a server that cannot start is a test error with the server log in it.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.questdb.pgserver import EmbeddedPostgres

PG_TEST_USER = "postgres"
PG_TEST_PASSWORD = "pg-test-Secret-7f3a"
# 1 MB WAL segments instead of 16 MB: a smaller template copies faster for every test.
PG_TEST_INITDB_OPTIONS = ("--wal-segsize=1",)
PG_TEST_START_TIMEOUT_S = 30.0

_counter = itertools.count()


def _scratch_root() -> str | None:
    """Where test clusters live: ``$MT5SUP_PG_TEST_DIR``, else tmpfs ``/dev/shm`` if usable
    (copying the ~1000-file template there takes a fifth of the time it takes on disk),
    else the default temporary directory."""
    chosen = os.environ.get("MT5SUP_PG_TEST_DIR")
    if chosen:
        return chosen
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return None


@pytest.fixture(scope="session")
def pg_base_dir() -> Iterator[Path]:
    """A private directory for every test server's data (removed at the end of the session).

    Not pytest's ``tmp_path``: as root, the server runs as an unprivileged user who must be
    able to reach the data directory, and pytest's base directory is private to root.
    """
    base = Path(tempfile.mkdtemp(prefix="mt5sup-pg-", dir=_scratch_root()))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_template(pg_base_dir: Path) -> Path:
    return EmbeddedPostgres.create_template(
        pg_base_dir / "template",
        user=PG_TEST_USER,
        password=PG_TEST_PASSWORD,
        durable=False,
        initdb_options=PG_TEST_INITDB_OPTIONS,
    )


@pytest.fixture
def pg_server_factory(
    pg_template: Path, pg_base_dir: Path
) -> Iterator[Callable[..., EmbeddedPostgres]]:
    """``make(start=True, **kwargs)``: a new server on a fresh copy of the template."""
    made: list[EmbeddedPostgres] = []

    def make(*, start: bool = True, **kwargs: Any) -> EmbeddedPostgres:
        kwargs.setdefault("user", PG_TEST_USER)
        kwargs.setdefault("password", PG_TEST_PASSWORD)
        kwargs.setdefault("durable", False)
        server = EmbeddedPostgres.from_template(
            pg_template, pg_base_dir / f"data-{next(_counter)}", **kwargs
        )
        made.append(server)
        if start:
            server.start(timeout_s=PG_TEST_START_TIMEOUT_S)
        return server

    try:
        yield make
    finally:
        for server in made:
            try:
                server.close()
            finally:
                shutil.rmtree(server.data_dir, ignore_errors=True)


@pytest.fixture
def pg_server(pg_server_factory: Callable[..., EmbeddedPostgres]) -> EmbeddedPostgres:
    return pg_server_factory()


@pytest.fixture
def pg_dsn(pg_server: EmbeddedPostgres) -> str:
    return pg_server.dsn
