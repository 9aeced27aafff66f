"""The real-QuestDB fixture's promise: a fresh clone without ../shared/questdb (or java) skips
the real-QuestDB tests and says why; CI (``CI=true``) fails instead of skipping."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import questdb_server


def point_at(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    monkeypatch.setattr(questdb_server, "QUESTDB_HOME", home)
    monkeypatch.setattr(questdb_server, "LAUNCHER", home / "start-questdb")


def test_missing_questdb_skips_with_the_reason(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    point_at(monkeypatch, tmp_path / "nowhere")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="QuestDB not found at .*nowhere"):
        questdb_server.require_questdb()


def test_missing_questdb_fails_in_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    point_at(monkeypatch, tmp_path / "nowhere")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set but the real QuestDB cannot run"):
        questdb_server.require_questdb()


def test_missing_java_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "start-questdb").write_text("#!/bin/sh\n")
    (tmp_path / "questdb.jar").write_bytes(b"")
    point_at(monkeypatch, tmp_path)
    monkeypatch.setenv("JAVA", str(tmp_path / "no-java"))
    assert "java not found" in (questdb_server.missing_reason() or "")
