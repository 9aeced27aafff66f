"""An actor's own named health checks (``check_changed`` notices): generic, in the core.

The actor sends ``check_notice(actor, check, status, output, at)``; the supervisor keeps the
latest per ``(actor, check)`` in its status view (``runtime.status`` ``checks``), and the health
document shows it as ``<actor>:<check>``. Virtual time, no resource.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from supervision.actor import Actor
from supervision.messages import check_notice
from supervision.shell.health import ESSENTIAL_ACTORS, health_document
from supervision.supervisor import ChildSpec, Supervisor
from tests.support.actors import running_supervisor
from tests.support.waiting import eventually


class Reporter(Actor):
    """Reports ``disk: pass``, then ``disk: fail`` with a remedy, then ``disk: pass``."""

    def __init__(self, steps: list[tuple[str, str]]) -> None:
        self.steps = steps

    async def serve(self) -> None:
        for status, output in self.steps:
            self.notify(check_notice(self.name, "disk", status, output, trio.current_time()))
            await trio.sleep(1.0)
        await trio.sleep_forever()


def health_of(sup: Supervisor) -> tuple[int, dict[str, Any]]:
    return health_document(SimpleNamespace(supervisor=sup, store={}, essential=ESSENTIAL_ACTORS))  # type: ignore[arg-type]


async def test_a_check_is_kept_in_status_and_shown_in_health(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    steps = [("pass", "ok"), ("fail", "disk full: free some space"), ("pass", "ok again")]
    async with running_supervisor(tmp_path) as sup:
        await sup.start_child(ChildSpec("bot", lambda: Reporter(steps)))

        def check() -> dict[str, Any] | None:
            [row] = sup.status()
            return (row.get("checks") or {}).get("disk")

        await eventually(lambda: check() is not None, within_s=5)
        assert check()["status"] == "pass"  # type: ignore[index]
        code, doc = health_of(sup)
        assert code == 200 and doc["status"] == "pass"
        assert doc["checks"]["bot:disk"][0]["status"] == "pass"

        await eventually(lambda: (check() or {}).get("status") == "fail", within_s=5)
        code, doc = health_of(sup)
        entry = doc["checks"]["bot:disk"][0]
        assert entry["status"] == "fail" and entry["output"] == "disk full: free some space"
        assert entry["componentId"] == "bot"
        # One actor's own check failing is a warning for the whole runtime, not a failure.
        assert code == 200 and doc["status"] == "warn" and "bot:disk fail" in doc["output"]

        await eventually(lambda: (check() or {}).get("status") == "pass", within_s=5)
        assert health_of(sup)[1]["status"] == "pass"
        kinds = [e.kind for e in sup.log.read_since(0) if e.actor == "bot"]
        assert kinds.count("check_changed") == 3  # each one is a logged event


def test_a_check_status_must_be_pass_warn_or_fail() -> None:
    with pytest.raises(ValueError, match="pass"):
        check_notice("bot", "disk", "ok", "", 0.0)
