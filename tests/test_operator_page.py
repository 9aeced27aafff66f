"""The operator's live page (DESIGN.md section 7), in a real browser against a real runtime.

``mt5-supervisor run`` runs as a subprocess (``tests/support/e2e.py``: simulator, embedded
PostgreSQL, short backoff and probe timings); headless Chromium (``tests/support/browser.py``, the
DevTools protocol) loads ``http://127.0.0.1:<health port>/`` and the tests read what is on
the screen (the DOM), while a separate control-channel client makes things happen and reads
the event log to compare.

Screenshots of the moments that matter are saved under ``$MT5SUP_SCREENSHOTS`` (else the
test's temporary directory) and their paths printed. Without Chromium the browser tests are
skipped, except in CI (``CI=true``), where a missing browser fails them.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from supervision.shell import web
from tests.support.browser import Browser, find_chromium
from tests.support.e2e import TOKEN, Rpc, RuntimeProcess, http_get, wait_all_connected

pytestmark = [pytest.mark.realserver, pytest.mark.slow]

# Two terminals: the page shows every actor, each terminal with its own controls.
ACTORS = ("cache", "questdb", "mt5", "mt5-acct2", "events_store")
# Small, so that a test can fill the server with sockets that have no token.
MAX_CONNECTIONS = 12


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProcess]:
    # A generous request rate: the page polls status and health, tests poll the log.
    with RuntimeProcess(tmp_path_factory.mktemp("operator-page"), sections={
        "control": {"requests_per_second": 200.0, "max_connections": MAX_CONNECTIONS,
                    "reserved_connections": 4},
        "mt5.terminals.acct2": {"backend": "simulator"}}).serving() as rt:
        yield rt


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        message = "chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}: the browser tests must run in CI")
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def browser(chromium: str, runtime: RuntimeProcess) -> Iterator[Browser]:
    with Browser(chromium) as b:
        b.open(runtime.http_base + "/")
        yield b


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = os.environ.get("MT5SUP_SCREENSHOTS")
    path = Path(root) if root else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def admin(runtime: RuntimeProcess) -> Iterator[Rpc]:
    with Rpc(runtime.ws_url, token=TOKEN) as client:
        wait_all_connected(client)
        yield client


def snap(browser: Browser, shots: Path, name: str) -> Path:
    path = browser.screenshot(shots / f"{name}.png")
    print(f"screenshot: {path}")
    return path


# ---------------------------------------------------------------------------- page reads
def tree_states(browser: Browser) -> dict[str, str]:
    return browser.evaluate("""Object.fromEntries(
        [...document.querySelectorAll('#tree-body tr.actor')].map(
            (tr) => [tr.dataset.actor, tr.querySelector('td.state').textContent]))""")


def timeline(browser: Browser) -> list[dict[str, Any]]:
    """The timeline's event rows, top (newest) first."""
    return browser.evaluate("""[...document.querySelectorAll('#timeline-body tr.event')].map(
        (tr) => ({seq: Number(tr.dataset.seq), actor: tr.dataset.actor, kind: tr.dataset.kind,
                  hidden: tr.classList.contains('hidden'),
                  cells: [...tr.cells].map((td) => td.textContent)}))""")


def notice_text(browser: Browser) -> str:
    return browser.evaluate("document.getElementById('notice').textContent")


def wait_all_connected_on_screen(browser: Browser, timeout: float = 20.0) -> None:
    browser.wait_for(f"""(() => {{
        const rows = [...document.querySelectorAll('#tree-body tr.actor')];
        const names = rows.map((tr) => tr.dataset.actor);
        return {json.dumps(list(ACTORS))}.every((n) => names.includes(n))
            && rows.every((tr) => tr.dataset.state === 'CONNECTED');
    }})()""", timeout=timeout)


def assert_timeline_matches_log(browser: Browser, runtime: RuntimeProcess) -> list[int]:
    """Rows in seq order (newest first), one per seq with none missing or doubled, each
    the event the log holds under that seq."""
    rows = timeline(browser)
    seqs = [r["seq"] for r in rows]
    assert seqs == list(range(seqs[0], seqs[0] - len(seqs), -1)), seqs
    log = runtime.log_by_seq()
    for row in rows:
        event = log[row["seq"]]
        assert (row["actor"], row["kind"]) == (event["actor"], event["kind"]), (row, event)
    return seqs


# ---------------------------------------------------------------------------- no browser
class _Endpoints:
    """What ``supervision.shell.web`` reads of a runtime: where its servers listen."""

    def __init__(self, **endpoints: tuple[str, int]) -> None:
        self.endpoints = endpoints


@pytest.mark.parametrize(("bound", "host", "connect_src"), [
    ("127.0.0.1", "127.0.0.1", "connect-src 'self' ws://127.0.0.1:8765;"),
    ("::1", "::1", "connect-src 'self' ws://[::1]:8765;"),
    # A wildcard bind tells the browser nothing: the page uses the host it came from.
    ("0.0.0.0", None, "connect-src 'self' ws:;"),
    ("::", None, "connect-src 'self' ws:;"),
])
def test_the_page_is_told_where_the_control_channel_is(bound: str, host: str | None,
                                                       connect_src: str) -> None:
    rt: Any = _Endpoints(control=(bound, 8765))
    assert web.page_config(rt)["control"] == {"host": host, "port": 8765}
    policy = dict(web.security_headers(rt))[b"content-security-policy"].decode()
    assert connect_src in policy and "script-src 'self';" in policy


def test_without_a_control_channel_the_page_is_told_so() -> None:
    rt: Any = _Endpoints()
    assert json.loads(web.config_body(rt))["control"] is None
    policy = dict(web.security_headers(rt))[b"content-security-policy"].decode()
    assert "connect-src 'self';" in policy


def test_the_page_files_ship_in_the_package() -> None:
    assets = web.load_assets()
    assert set(assets) == {"/", "/index.html", "/app.js", "/style.css"}
    assert b'<script src="app.js"' in assets["/"].body
    # No inline script or handler: the Content-Security-Policy would block it.
    assert b"<script>" not in assets["/"].body and b" onclick=" not in assets["/"].body
    # The page never hands text to the HTML parser.
    assert not re.search(rb"\.(inner|outer)HTML\b|insertAdjacentHTML|document\.write",
                         assets["/app.js"].body)


# ---------------------------------------------------------------------------- HTTP only
def test_page_files_are_served_with_a_strict_policy(runtime: RuntimeProcess) -> None:
    status, headers, body = http_get(runtime.http_base + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'<script src="app.js"' in body
    policy = headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy
    assert f"ws://127.0.0.1:{runtime.control_port}" in policy
    for path, kind in (("/app.js", "text/javascript"), ("/style.css", "text/css")):
        status, headers, body = http_get(runtime.http_base + path)
        assert status == 200 and headers["Content-Type"].startswith(kind) and body
    status, _, body = http_get(runtime.http_base + "/ui/config.json")
    assert status == 200
    assert json.loads(body)["control"] == {"host": "127.0.0.1", "port": runtime.control_port}
    assert http_get(runtime.http_base + "/app.js", method="POST")[0] == 405
    assert http_get(runtime.http_base + "/nothing.js")[0] == 404


# ---------------------------------------------------------------------------- in the browser
def test_tree_shows_every_actor_connected(browser: Browser, runtime: RuntimeProcess,
                                          shots: Path) -> None:
    wait_all_connected_on_screen(browser)
    browser.wait_for("document.getElementById('conn').textContent.includes('live')")
    browser.wait_for("document.getElementById('health').dataset.status === 'pass'")
    assert browser.evaluate(
        "document.querySelector('a[href=\"/metrics\"]') !== null")
    rows = timeline(browser)
    assert rows and any(r["kind"] == "state_changed" for r in rows)
    snap(browser, shots, "01-all-connected")


def test_terminal_crash_goes_through_reconnecting_and_error_and_back(
        browser: Browser, runtime: RuntimeProcess, admin: Rpc, shots: Path) -> None:
    wait_all_connected_on_screen(browser)
    # Record every state the mt5 row shows, as the page renders it.
    browser.evaluate("""(() => {
        window.__mt5States = [];
        const record = () => {
            const tr = document.querySelector('#tree-body tr.actor[data-actor="mt5"]');
            const state = tr && tr.dataset.state;
            const seen = window.__mt5States;
            if (state && seen[seen.length - 1] !== state) seen.push(state);
        };
        record();
        new MutationObserver(record).observe(document.getElementById('tree-body'),
            {childList: true, subtree: true, attributes: true});
        return true;
    })()""")
    # Outlasts detection (<= 1 s probe) and the 0.2 + 0.4 + 0.8 s of backoff: escalates.
    admin.result("sim.inject", {"fault": "terminal_crash", "duration_s": 4.0})
    browser.wait_for("window.__mt5States.includes('ERROR')", timeout=15)
    error_row = browser.evaluate("""(() => {
        const tr = document.querySelector('#tree-body tr.actor[data-actor="mt5"]');
        return {retry: tr.querySelector('td.retry').textContent,
                error: tr.querySelector('td.error').textContent,
                attempt: tr.querySelector('td.attempt').textContent};
    })()""")
    browser.wait_for("document.getElementById('health').dataset.status === 'warn'")
    snap(browser, shots, "02-mt5-error")
    # The README's picture (docs/operator-page.png): the same moment, smaller.
    print("screenshot:", browser.screenshot(shots / "operator-page.png", size=(1400, 760),
                                            scale=0.6))
    assert error_row["error"].startswith("MT5_"), error_row
    assert error_row["attempt"] == "3", error_row
    # Back once the fault heals and the ERROR-state probe passes.
    browser.wait_for("window.__mt5States[window.__mt5States.length - 1] === 'CONNECTED' "
                     "&& window.__mt5States.includes('ERROR')", timeout=20)
    states = browser.evaluate("window.__mt5States")
    assert states[0] == "CONNECTED" and states[-1] == "CONNECTED", states
    assert "RECONNECTING" in states and "ERROR" in states, states
    assert states.index("RECONNECTING") < states.index("ERROR"), states
    wait_all_connected_on_screen(browser)
    snap(browser, shots, "03-mt5-recovered")

    # The timeline showed the same story, in seq order, as the log has it.
    browser.wait_for(f"Number(document.getElementById('last-seq').textContent) >= "
                     f"{runtime.log_events()[-1]['seq']}")
    assert_timeline_matches_log(browser, runtime)
    kinds = [r["kind"] for r in reversed(timeline(browser)) if r["actor"] == "mt5"]
    for kind in ("attempt_failed", "backoff_scheduled", "escalated", "recovered"):
        assert kind in kinds, kinds
    assert kinds.index("escalated") < kinds.index("recovered"), kinds


def test_timeline_filters_by_actor_and_kind(browser: Browser) -> None:
    def choose(select: str, value: str) -> None:
        browser.evaluate(f"""(() => {{
            const s = document.getElementById({json.dumps(select)});
            s.value = {json.dumps(value)};
            s.dispatchEvent(new Event('change'));
            return s.value;
        }})()""")

    choose("filter-actor", "mt5")
    rows = timeline(browser)
    assert any(not r["hidden"] for r in rows)
    assert all(r["hidden"] == (r["actor"] != "mt5") for r in rows)
    choose("filter-kind", "state_changed")
    assert all(r["hidden"] == (r["actor"] != "mt5" or r["kind"] != "state_changed")
               for r in timeline(browser))
    choose("filter-actor", "")
    choose("filter-kind", "")
    assert not any(r["hidden"] for r in timeline(browser))


def test_restart_is_refused_without_the_token_and_works_with_it(
        browser: Browser, runtime: RuntimeProcess, shots: Path) -> None:
    wait_all_connected_on_screen(browser)
    click_restart = ("document.querySelector('#tree-body tr.actor[data-actor=\"cache\"] "
                     "button.restart').click() === undefined")
    before = runtime.log_events()[-1]["seq"]
    browser.evaluate(click_restart)
    browser.wait_for("document.getElementById('notice').dataset.kind === 'error'")
    text = notice_text(browser)
    assert "actor.restart cache: refused" in text and "needs the token" in text, text
    snap(browser, shots, "04-restart-refused")
    assert not [e for e in runtime.log_events() if e["seq"] > before
                and e["actor"] == "cache" and e["kind"] == "state_changed"]

    # A wrong token is refused, then the right one signs in.
    sign_in = """((token) => {
        document.getElementById('token').value = token;
        document.getElementById('auth-form').requestSubmit();
        return true;
    })"""
    browser.evaluate(f"{sign_in}({json.dumps('not-the-token')})")
    browser.wait_for("document.getElementById('notice').textContent.includes('invalid token')")
    browser.evaluate(f"{sign_in}({json.dumps(TOKEN)})")
    browser.wait_for("document.getElementById('auth-state').textContent === 'signed in'")
    assert browser.evaluate("document.getElementById('token').value") == ""

    browser.evaluate(click_restart)
    browser.wait_for("document.getElementById('notice').textContent === "
                     "'actor.restart cache: ok'")
    runtime.wait_log(lambda events: any(
        e["seq"] > before and e["actor"] == "cache" and e["kind"] == "state_changed"
        and e["to"] == "RECONNECTING" for e in events))
    browser.wait_for("[...document.querySelectorAll('#timeline-body tr.event')].some("
                     f"(tr) => Number(tr.dataset.seq) > {before} && tr.dataset.actor === "
                     "'cache' && tr.dataset.kind === 'state_changed')")
    wait_all_connected_on_screen(browser)
    snap(browser, shots, "05-restart-done")


def test_inject_and_clear_a_fault_in_one_terminal_from_the_page(
        browser: Browser, shots: Path) -> None:
    # Signed in by the previous test (the page keeps the token for its session).
    browser.wait_for("document.getElementById('auth-state').textContent === 'signed in'")
    wait_all_connected_on_screen(browser)
    row = "document.querySelector('#tree-body tr.actor[data-actor=\"mt5-acct2\"]')"
    browser.evaluate(f"""(() => {{
        const tr = {row};
        tr.querySelector('select.fault').value = 'terminal_crash';
        tr.querySelector('button.inject').click();
        return true;
    }})()""")
    browser.wait_for("document.getElementById('notice').textContent === "
                     "'sim.inject terminal_crash mt5-acct2: ok'")
    browser.wait_for(f"['RECONNECTING', 'ERROR'].includes({row}.dataset.state)", timeout=10)
    # The other terminal is not touched.
    assert tree_states(browser)["mt5"] == "CONNECTED"
    snap(browser, shots, "06-second-terminal-down")
    browser.evaluate(f"{row}.querySelector('button.clear').click() === undefined")
    browser.wait_for("document.getElementById('notice').textContent === "
                     "'sim.inject clear mt5-acct2: ok'")
    wait_all_connected_on_screen(browser, timeout=30)


def test_a_chosen_fault_survives_the_refreshes(browser: Browser) -> None:
    """The tree is updated in place: what the operator is choosing is not reset."""
    choose = """(() => {
        const tr = document.querySelector('#tree-body tr.actor[data-actor="mt5"]');
        tr.querySelector('select.fault').value = 'hang';
        tr.querySelector('input.duration').value = '7';
        return page.statusRefreshes;
    })()"""
    refreshes = browser.evaluate(choose)
    browser.wait_for(f"page.statusRefreshes >= {refreshes + 2}", timeout=15)
    assert browser.evaluate("""(() => {
        const tr = document.querySelector('#tree-body tr.actor[data-actor="mt5"]');
        return [tr.querySelector('select.fault').value, tr.querySelector('input.duration').value];
    })()""") == ["hang", "7"]


def test_timeline_resumes_after_a_reconnect_without_gap_or_duplicate(
        browser: Browser, runtime: RuntimeProcess, admin: Rpc) -> None:
    wait_all_connected_on_screen(browser)
    connections = browser.evaluate("page.connections")
    # Drop the page's connection and make events while it is away.
    def cache_transitions(events: list[dict[str, Any]]) -> int:
        return sum(1 for e in events if e["actor"] == "cache" and e["kind"] == "state_changed")

    before = cache_transitions(runtime.log_events())
    browser.evaluate("page.ws.close() === undefined")
    for _ in range(3):
        admin.result("actor.restart", {"actor": "cache"})
    events = runtime.wait_log(lambda evs: cache_transitions(evs) >= before + 6)
    head = events[-1]["seq"]
    browser.wait_for(f"Number(document.getElementById('last-seq').textContent) >= {head}",
                     timeout=20)
    assert browser.evaluate("page.connections") == connections + 1
    assert_timeline_matches_log(browser, runtime)


def test_overflow_is_shown_and_the_gap_refetched(browser: Browser, runtime: RuntimeProcess,
                                                 admin: Rpc) -> None:
    wait_all_connected_on_screen(browser)
    browser.wait_for("page.subscription !== null")
    # What the server sends when this subscription's buffer overflows.
    browser.evaluate("""onMessage(JSON.stringify({jsonrpc: '2.0', method: 'events.overflow',
        params: {subscription: page.subscription, missed: 7,
                 resume_after_seq: page.lastSeq}})) === undefined""")
    marker = browser.wait_for("document.querySelector('#timeline-body tr.marker') && "
                              "document.querySelector('#timeline-body tr.marker').textContent")
    assert "events.overflow: 7 events missed" in marker, marker
    admin.result("actor.restart", {"actor": "cache"})
    head = runtime.wait_log(lambda evs: evs[-1]["actor"] == "cache"
                            and evs[-1]["to"] == "CONNECTED")[-1]["seq"]
    browser.wait_for(f"Number(document.getElementById('last-seq').textContent) >= {head}")
    assert_timeline_matches_log(browser, runtime)


def test_the_operator_gets_in_with_the_token_while_other_sockets_fill_the_server(
        browser: Browser, runtime: RuntimeProcess, shots: Path) -> None:
    """A local process holding every connection without the token must not lock the
    operator's page out: the page offers the token in the handshake (a browser cannot send
    an Authorization header) and takes one of the connections reserved for it."""
    # A fresh page, not signed in, with its connection...
    browser.open(runtime.http_base + "/")
    browser.wait_for("page.subscription !== null && !page.authenticated")
    crowd: list[Rpc] = []

    def fill() -> None:
        """Take every free connection (until the server answers 503)."""
        for _ in range(MAX_CONNECTIONS + 1):
            try:
                hog = Rpc(runtime.ws_url)
            except InvalidStatus as refused:
                assert refused.response.status_code == 503
                return
            # Subscribed (never idle), to nothing that happens (nothing to read).
            hog.result("events.subscribe", {"actors": ["nobody"]})
            crowd.append(hog)
        pytest.fail("the server never filled up")

    try:
        # ...loses it, and cannot get back in: the crowd takes the slot it freed (each
        # time the page's retry wins the race, it is dropped again).
        deadline = time.monotonic() + 30
        while not browser.evaluate("page.reconnects >= 2"):
            assert time.monotonic() < deadline, "the page was never locked out"
            fill()
            browser.evaluate("page.ws !== null && page.ws.readyState === WebSocket.OPEN "
                             "&& page.ws.close() === undefined")
            time.sleep(0.1)
        assert browser.evaluate("page.subscription === null && !page.authenticated")
        snap(browser, shots, "10-full-read-only-locked-out")
        # ...until the operator signs in: the next handshake carries the token.
        browser.evaluate(f"""(() => {{
            document.getElementById('token').value = {json.dumps(TOKEN)};
            document.getElementById('auth-form').requestSubmit();
            return true;
        }})()""")
        browser.wait_for("document.getElementById('auth-state').textContent === 'signed in'"
                         " && page.subscription !== null", timeout=20)
        wait_all_connected_on_screen(browser)
        assert browser.evaluate("page.ws.protocol") == "mt5sup.v1"
        # Signed in by the handshake: a mutating method works without an `auth` call.
        before = runtime.log_events()[-1]["seq"]
        browser.evaluate("document.querySelector('#tree-body tr.actor[data-actor=\"cache\"] "
                         "button.restart').click() === undefined")
        browser.wait_for("document.getElementById('notice').textContent === "
                         "'actor.restart cache: ok'")
        runtime.wait_log(lambda events: any(e["seq"] > before and e["actor"] == "cache"
                                            for e in events))
        snap(browser, shots, "11-full-signed-in-through-the-reserve")
        # A dropped connection comes back the same way.
        connections = browser.evaluate("page.connections")
        browser.evaluate("page.ws.close() === undefined")
        browser.wait_for(f"page.connections > {connections} && page.subscription !== null"
                         " && page.authenticated", timeout=20)
    finally:
        for hog in crowd:
            hog.close()
    wait_all_connected_on_screen(browser)


def test_server_text_is_shown_as_text_never_as_markup(browser: Browser) -> None:
    """Runs last: it feeds the page an event the server did not send."""
    browser.wait_for("page.subscription !== null")
    hostile = '<img src=x onerror="window.__pwned=1"><b id="injected">bold</b>'
    browser.evaluate(f"""onMessage(JSON.stringify({{jsonrpc: '2.0', method: 'events.batch',
        params: {{subscription: page.subscription, events: [{{
            seq: page.lastSeq + 1, ts: new Date().toISOString(), actor: {json.dumps(hostile)},
            kind: {json.dumps(hostile)}, from: null, to: null, attempt: null, delay_s: null,
            error: {{code: 'X', message: {json.dumps(hostile)}}}}}]}}}})) === undefined""")
    row = timeline(browser)[0]
    assert row["actor"] == hostile and row["cells"][2] == hostile
    assert hostile in row["cells"][4]
    assert browser.evaluate("document.getElementById('injected') === null "
                            "&& document.querySelector('#timeline-body img') === null "
                            "&& window.__pwned === undefined")
    assert not [line for line in browser.console if line.startswith("exception")], \
        browser.console
