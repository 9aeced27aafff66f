"""The example bot of docs/embedding.md, run exactly as the page shows it.

It embeds the whole runtime (simulated terminal, a real PostgreSQL server as the
QuestDB store), adds its own actor, and halts orders while the terminal is escalated.
Real time with short timings: the embedded database runs real threads and sockets.
"""

# Polling with short sleeps is deliberate here: the doc's bot exposes plain attributes.
# ruff: noqa: ASYNC110
from __future__ import annotations

import re
import types
from pathlib import Path

import trio

from supervision import RuntimeConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "embedding.md"


def load_example() -> types.ModuleType:
    text = DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = next(b for b in blocks if "async def run_bot" in b)
    module = types.ModuleType("embedding_example")
    exec(compile(example, str(DOC), "exec"), module.__dict__)  # noqa: S102 - our own doc
    return module


def fast_config(tmp_path: Path, dsn: str) -> RuntimeConfig:
    return RuntimeConfig.from_mapping({
        "runtime": {"state_dir": str(tmp_path / "state"), "fsync": "never"},
        "control": {"enabled": False},
        "health": {"enabled": False},
        "supervisor": {"backoff_base_s": 0.1, "health_interval_s": 1.0,
                       "call_timeout_s": 2.0},
        "questdb": {"dsn": dsn},
    }, env={})


async def test_embedding_example_halts_orders_while_mt5_is_escalated(tmp_path, pg_dsn):
    example = load_example()
    seen: dict[str, int] = {}

    async def scenario(rt, gate, strategy) -> None:
        # Snapshot the order count at the very moment the gate re-opens (polling for it
        # would race with the strategy's next order).
        reopen = gate.resume

        def resume_and_snapshot() -> None:
            seen["sent_at_resume"] = strategy.orders_sent
            seen["blocked"] = strategy.orders_blocked
            reopen()

        gate.resume = resume_and_snapshot
        with trio.fail_after(10):
            while strategy.orders_sent < 1:
                await trio.sleep(0.05)
        await rt.inject("terminal_crash", duration_s=2.0)
        with trio.fail_after(10):
            while gate.open:
                await trio.sleep(0.02)
        assert "MT5_INIT_FAILED" in gate.reason or "initialize" in gate.reason
        seen["sent_at_halt"] = strategy.orders_sent
        with trio.fail_after(15):
            while not gate.open:
                await trio.sleep(0.02)

    gate, strategy = await example.run_bot(fast_config(tmp_path, pg_dsn), scenario)
    assert gate.halts == 1
    assert seen["sent_at_resume"] == seen["sent_at_halt"], "an order went out while halted"
    assert seen["blocked"] > 0
    assert gate.open
