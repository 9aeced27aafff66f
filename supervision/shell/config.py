"""Runtime configuration: TOML, environment overrides, secrets from the environment.

Rules (DESIGN.md section 8):

* Every key has a type and a default; a file may set any subset. Unknown sections or keys and
  wrong types are refused at start with the key and the file named (``ConfigError``).
* ``[mt5]``, ``[questdb]`` and ``[cache]`` may override any ``[supervisor]`` timing for that
  actor alone.
* Environment overrides: ``MT5SUP_<SECTION>_<KEY>`` (e.g. ``MT5SUP_CONTROL_PORT=9000``),
  parsed as TOML values when they parse, else taken as strings.
* Secrets never live in the file: the control token comes from the variable named by
  ``control.token_env``; the MT5 password from the variable named by ``mt5.password_env``
  (default ``MT5_PASSWORD``), a ``[mt5.terminals.NAME]`` terminal's from its own
  ``password_env`` (default ``MT5_PASSWORD_<NAME>``). A DSN may carry a password (it then
  comes from the file or ``MT5SUP_QUESTDB_DSN``); it is redacted everywhere it is shown.
* ``[mt5.terminals.NAME]`` tables take ``[mt5]``'s keys, defaulting to ``[mt5]``'s values
  (``RuntimeConfig.terminals``, after ``MT5SUP_MT5_*``); ``MT5SUP_MT5_TERMINALS_<NAME>_<KEY>``
  overrides one key of a terminal the file declares.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from supervision.breaker import BreakerConfig
from supervision.eventlog import FSYNC_POLICIES
from supervision.settings import ActorSettings

ENV_PREFIX = "MT5SUP_"
TERMINALS_ENV = "terminals_"  # MT5SUP_MT5_TERMINALS_<NAME>_<KEY>, after "MT5SUP_MT5_"


class ConfigError(ValueError):
    pass


# key -> (type, default). ``float`` accepts integers; ``list[float]`` is written "floats".
SUPERVISOR_KEYS: dict[str, tuple[str, Any]] = {
    "backoff_base_s": ("float", 1.0),
    "backoff_factor": ("float", 2.0),
    "max_attempts": ("int", 3),
    "jitter": ("float", 0.0),
    "health_interval_s": ("float", 30.0),
    "probe_timeout_s": ("float", 5.0),
    "call_timeout_s": ("float", 10.0),
    "connect_timeout_s": ("float", 10.0),
    "shutdown_timeout_s": ("float", 5.0),
    "queue_limit": ("int", 1000),
    "stable_s": ("float", 30.0),
}

SCHEMA: dict[str, dict[str, tuple[str, Any]]] = {
    "runtime": {
        "state_dir": ("str", "./var"),
        "fsync": ("str", "batch"),
        "subscriber_buffer": ("int", 1000),
        "log_buffer": ("int", 10_000),  # events kept in memory while the log is unwritable
    },
    "control": {
        "enabled": ("bool", True),
        "host": ("str", "127.0.0.1"),
        "port": ("int", 8765),
        "token_env": ("str", "MT5SUP_TOKEN"),
        "max_message_bytes": ("int", 1024 * 1024),
        "max_connections": ("int", 256),
        "reserved_connections": ("int", 16),  # more, only with a valid bearer header
        "handshake_timeout_s": ("float", 10.0),  # upgrade, and the first message without token
        "idle_timeout_s": ("float", 300.0),  # no request, none running, no subscription
        # A wrong token from a source past its budget is answered after this long.
        "auth_tarpit_s": ("float", 4.0),
        "requests_per_second": ("float", 200.0),
        "open_reads": ("bool", True),
    },
    "health": {
        "enabled": ("bool", True),
        "host": ("str", "127.0.0.1"),
        "port": ("int", 8766),
    },
    "supervisor": dict(SUPERVISOR_KEYS),
    "mt5": {
        "enabled": ("bool", True),
        "backend": ("str", "simulator"),
        "worker": ("str", "process"),  # one OS process per terminal (docs/mt5.md)
        "password_env": ("str", "MT5_PASSWORD"),
        "path": ("str", ""),
        "login": ("int", 0),
        "server": ("str", ""),
        "host": ("str", "127.0.0.1"),
        "port": ("int", 18812),
        "terminal_timeout_ms": ("int", 60_000),
        "simulator_seed": ("int", 0),
        "breaker_threshold": ("int", 5),
        "breaker_open_s": ("float", 30.0),
        **SUPERVISOR_KEYS,
    },
    "questdb": {
        "enabled": ("bool", True),
        "dsn": ("str", ""),
        # External database: the control channel's free-form SQL connects with this DSN (a
        # least-privilege user); "" uses dsn (a warning at start says so).
        "query_dsn": ("str", ""),
        "retry_delays_s": ("floats", [0.1, 0.5, 1.0]),
        "breaker_threshold": ("int", 5),
        "breaker_open_s": ("float", 30.0),
        "pool_min_size": ("int", 0),
        "pool_max_size": ("int", 4),
        "command_timeout_s": ("float", 10.0),
        # Embedded server: per-statement limit of the control channel's query role.
        "query_statement_timeout_s": ("float", 5.0),
        "persist_events": ("bool", True),
        "persist_batch_size": ("int", 500),
        **SUPERVISOR_KEYS,
    },
    "cache": {
        "ttl_s": ("float", 300.0),
        "max_entries": ("int", 10_000),
        # Last-known-good answers kept for degraded reads: per actor, bounded in bytes
        # (estimated), apart from the bot's own entries; larger answers are not kept.
        "max_bytes": ("int", 64 * 1024 * 1024),
        "max_entry_bytes": ("int", 1024 * 1024),
        **SUPERVISOR_KEYS,
    },
}

ACTOR_SECTIONS = ("mt5", "questdb", "cache")

# Lower bounds: (minimum, strictly greater?). Every other number must be >= 0.
MINIMUMS: dict[str, tuple[float, bool]] = {
    "max_attempts": (1, False), "breaker_threshold": (1, False), "queue_limit": (1, False),
    "max_entries": (1, False), "pool_max_size": (1, False), "persist_batch_size": (1, False),
    "subscriber_buffer": (1, False), "max_connections": (1, False), "log_buffer": (1, False),
    "max_message_bytes": (1024, False), "terminal_timeout_ms": (1, False),
    "health_interval_s": (0, True), "probe_timeout_s": (0, True), "call_timeout_s": (0, True),
    "connect_timeout_s": (0, True), "shutdown_timeout_s": (0, True), "ttl_s": (0, True),
    "command_timeout_s": (0, True), "backoff_factor": (1, False),
    "query_statement_timeout_s": (0, True),
    "handshake_timeout_s": (0, True), "idle_timeout_s": (0, True),
}

CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("runtime", "fsync"): FSYNC_POLICIES,
    ("mt5", "backend"): ("simulator", "metatrader5", "mt5linux"),
    ("mt5", "worker"): ("process", "thread", "inline"),
}
# [mt5.terminals.NAME]: the actor is "mt5-NAME", so NAME must make a plain actor name.
TERMINAL_NAME = re.compile(r"[A-Za-z0-9_]{1,40}")


def _check(section: str, key: str, kind: str, value: Any, source: str) -> Any:
    where = f"{section}.{key} in {source}"
    ok = {
        "str": lambda v: isinstance(v, str),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "floats": lambda v: isinstance(v, list) and all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in v),
    }[kind](value)
    if not ok:
        expected = {"floats": "a list of numbers", "int": "an integer",
                    "float": "a number", "bool": "true or false",
                    "str": "a string"}[kind]
        raise ConfigError(f"{where}: expected {expected}, got {type(value).__name__} "
                          f"{value!r}")
    if kind == "float":
        value = float(value)
    if kind in ("int", "float"):
        minimum, strict = MINIMUMS.get(key, (0, False))
        if value < minimum or (strict and value == minimum):
            rule = f"> {minimum:g}" if strict else f">= {minimum:g}"
            raise ConfigError(f"{where}: must be {rule}, got {value!r}")
    if kind == "floats":
        value = [float(x) for x in value]
        if any(x < 0 for x in value):
            raise ConfigError(f"{where}: delays must be >= 0, got {value!r}")
    if kind == "int" and key.endswith(("port",)) and not 0 <= value <= 65535:
        raise ConfigError(f"{where}: not a TCP port: {value!r}")
    if (section, key) in (("questdb", "dsn"), ("questdb", "query_dsn")) and value:
        _check_dsn(value, where)
    choices = CHOICES.get((section.split(".")[0], key))  # mt5.terminals.X: as [mt5]
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: must be one of {', '.join(choices)}, got {value!r}")
    return value


def _check_dsn(dsn: str, where: str) -> None:
    """A DSN that can never connect is a configuration error now, not a reconnect loop.
    The value is never quoted back: it may carry a password."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(dsn)
        _ = parts.port  # a port that is not a number, or out of range, raises here
    except ValueError as exc:
        # urllib's own words only name the part (e.g. "Port out of range 0-65535").
        raise ConfigError(f"{where}: not a valid DSN ({exc})") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"{where}: a DSN must start with postgresql:// (or postgres://), "
                          f"not {parts.scheme + '://' if parts.scheme else 'nothing'}")
    if not parts.hostname and "host=" not in parts.query:
        raise ConfigError(f"{where}: the DSN names no host")


def _terminal_values(name: Any, table: Any, mt5: Mapping[str, Any],
                     source: str) -> dict[str, Any]:
    """One ``[mt5.terminals.NAME]`` table: [mt5]'s keys, each defaulting to [mt5]'s value,
    except ``password_env`` (default ``MT5_PASSWORD_<NAME>``): accounts never share one."""
    if not isinstance(name, str) or not TERMINAL_NAME.fullmatch(name):
        raise ConfigError(f"{source}: [mt5.terminals.{name}]: a terminal name is 1-40 "
                          "letters, digits or _")
    section = f"mt5.terminals.{name}"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{source}: [{section}] must be a table")
    values = dict(mt5)
    values["password_env"] = f"MT5_PASSWORD_{name.upper()}"
    for key, value in table.items():
        if key not in SCHEMA["mt5"]:
            raise ConfigError(f"{source}: unknown key {section}.{key}")
        values[key] = _check(section, key, SCHEMA["mt5"][key][0], value, source)
    return values


def _with_terminal_env(tables: Mapping[str, Any],
                       overrides: list[tuple[str, str, str]]) -> Mapping[str, Any]:
    """``MT5SUP_MT5_TERMINALS_<NAME>_<KEY>`` applied to the ``[mt5.terminals.NAME]`` tables.

    Names and keys both hold ``_``, so a variable is matched against the terminals the file
    declares (case-insensitively), the longest name first; the environment adjusts a
    terminal, it does not create one (its name and password variable belong in the file)."""
    if not overrides:
        return tables
    merged = {name: dict(table) if isinstance(table, Mapping) else table
              for name, table in tables.items()}
    by_length = sorted((n for n in merged if isinstance(n, str)), key=len, reverse=True)
    for variable, rest, text in overrides:
        for terminal in by_length:
            prefix = terminal.lower() + "_"
            key = rest[len(prefix):]
            if rest.startswith(prefix) and key in SCHEMA["mt5"]:
                twins = sorted(n for n in by_length if n.lower() == terminal.lower())
                if len(twins) > 1:
                    raise ConfigError(
                        f"environment variable {variable}: matches terminals "
                        f"{' and '.join(twins)} (names differing only in case)")
                table = merged[terminal]
                if isinstance(table, dict):  # else _terminal_values refuses the table
                    table[key] = _check(f"mt5.terminals.{terminal}", key,
                                        SCHEMA["mt5"][key][0], _env_value(text),
                                        f"environment variable {variable}")
                break
        else:
            declared = ", ".join(sorted(merged)) or "none"
            raise ConfigError(
                f"environment variable {variable}: no [mt5.terminals.NAME] key matches it "
                f"(MT5SUP_MT5_TERMINALS_<NAME>_<KEY>; terminals in the file: {declared})")
    return merged


def _refuse_shared_terminals(mt5: Mapping[str, Any],
                             terminals: Mapping[str, Mapping[str, Any]], source: str) -> None:
    """Two actors on one real terminal would switch each other's account (``initialize``
    with another login re-logs the shared terminal): each needs its own ``path`` (the
    MetaTrader5 package) or its own ``host:port`` (the mt5linux bridge). A terminal
    section inherits [mt5]'s, so a section that sets only ``login`` is refused here."""
    seen: dict[tuple[Any, ...], str] = {}
    sections = {"mt5": mt5, **{f"mt5.terminals.{n}": t for n, t in terminals.items()}}
    for section, keys in sections.items():
        if not keys["enabled"] or keys["backend"] == "simulator":
            continue
        where = ((keys["backend"], keys["path"]) if keys["backend"] == "metatrader5"
                 else (keys["backend"], keys["host"], keys["port"]))
        if where in seen:
            what = (f"path {keys['path']!r}" if keys["backend"] == "metatrader5"
                    else f"{keys['host']}:{keys['port']}")
            raise ConfigError(
                f"{source}: [{section}] and [{seen[where]}] would share one terminal ({what}): "
                "give each terminal its own path (metatrader5) or host and port (mt5linux)")
        seen[where] = section


def _env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


@attrs.frozen
class RuntimeConfig:
    """The validated configuration. ``values[section][key]``, all keys present."""

    values: Mapping[str, Mapping[str, Any]] = attrs.field(
        factory=lambda: {s: {k: d for k, (_, d) in keys.items()} for s, keys in SCHEMA.items()})
    source: str = "<defaults>"
    env: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    # [mt5.terminals.NAME] -> its keys (all of [mt5]'s, inherited where not set).
    terminals: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None,
             env: Mapping[str, str] | None = None) -> RuntimeConfig:
        env = dict(os.environ if env is None else env)
        raw: dict[str, Any] = {}
        source = "<defaults>"
        if path is not None:
            source = str(path)
            try:
                raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise ConfigError(f"{source}: no such configuration file") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        return cls.from_mapping(raw, source=source, env=env)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], *, source: str = "<mapping>",
                     env: Mapping[str, str] | None = None) -> RuntimeConfig:
        env = dict(os.environ if env is None else env)
        values = {s: {k: d for k, (_, d) in keys.items()} for s, keys in SCHEMA.items()}
        explicit: set[tuple[str, str]] = set()  # set by the file or the environment
        terminal_tables: Mapping[str, Any] = {}
        for section, table in raw.items():
            if section not in SCHEMA:
                raise ConfigError(f"{source}: unknown section [{section}]")
            if not isinstance(table, Mapping):
                raise ConfigError(f"{source}: [{section}] must be a table")
            for key, value in table.items():
                if (section, key) == ("mt5", "terminals"):
                    if not isinstance(value, Mapping):
                        raise ConfigError(f"{source}: [mt5.terminals] must be a table")
                    terminal_tables = value
                    continue
                if key not in SCHEMA[section]:
                    raise ConfigError(f"{source}: unknown key {section}.{key}")
                values[section][key] = _check(section, key, SCHEMA[section][key][0], value,
                                              source)
                explicit.add((section, key))
        terminal_env: list[tuple[str, str, str]] = []  # (variable, rest of its name, text)
        for name, text in env.items():
            if not name.startswith(ENV_PREFIX):
                continue
            rest = name[len(ENV_PREFIX):].lower()
            section, _, key = rest.partition("_")
            if section not in SCHEMA:
                continue  # e.g. MT5SUP_TOKEN, the default token variable
            if section == "mt5" and key.startswith(TERMINALS_ENV):
                terminal_env.append((name, key[len(TERMINALS_ENV):], text))
                continue
            if key not in SCHEMA[section]:
                raise ConfigError(f"environment variable {name}: unknown key {section}.{key}")
            values[section][key] = _check(section, key, SCHEMA[section][key][0],
                                          _env_value(text), f"environment variable {name}")
            explicit.add((section, key))
        # Actor sections inherit the [supervisor] values (from the file or the environment)
        # that they do not set themselves.
        for section in ACTOR_SECTIONS:
            for key in SUPERVISOR_KEYS:
                if (section, key) not in explicit:
                    values[section][key] = values["supervisor"][key]
        terminal_tables = _with_terminal_env(terminal_tables, terminal_env)
        terminals = {name: _terminal_values(name, table, values["mt5"], source)
                     for name, table in terminal_tables.items()}
        _refuse_shared_terminals(values["mt5"], terminals, source)
        return cls(values=values, source=source, env=env, terminals=terminals)

    def with_overrides(self, **sections: Mapping[str, Any]) -> RuntimeConfig:
        """A copy with some keys replaced (validated), e.g. ``control={"port": 0}``."""
        values = {s: dict(v) for s, v in self.values.items()}
        for section, table in sections.items():
            if section not in SCHEMA:
                raise ConfigError(f"overrides: unknown section [{section}]")
            for key, value in table.items():
                if key not in SCHEMA[section]:
                    raise ConfigError(f"overrides: unknown key {section}.{key}")
                values[section][key] = _check(section, key, SCHEMA[section][key][0], value,
                                              "overrides")
                if section == "supervisor":  # as in a file: actors inherit it
                    for actor in ACTOR_SECTIONS:
                        if key not in sections.get(actor, {}):
                            values[actor][key] = values["supervisor"][key]
        return attrs.evolve(self, values=values)

    # ------------------------------------------------------------------ views
    def __getitem__(self, section: str) -> Mapping[str, Any]:
        return self.values[section]

    @property
    def state_dir(self) -> Path:
        return Path(self.values["runtime"]["state_dir"])

    @property
    def token(self) -> str | None:
        name = self.values["control"]["token_env"]
        return self.env.get(name) or None

    @property
    def mt5_password(self) -> str | None:
        return self.env.get(self.values["mt5"]["password_env"]) or None

    def terminal_password(self, name: str) -> str | None:
        """The password of ``[mt5.terminals.NAME]``, from its ``password_env`` variable."""
        return self.env.get(self.terminals[name]["password_env"]) or None

    def terminal_settings(self, name: str) -> ActorSettings:
        return self.actor_settings("mt5", self.terminals[name])

    def actor_settings(self, section: str,
                       values: Mapping[str, Any] | None = None) -> ActorSettings:
        v = self.values[section] if values is None else values
        breaker = None
        retry: tuple[float, ...] = ()
        if "breaker_threshold" in v:
            # One breaker for every actor: a successful reconnect or probe by the supervisor
            # is its half-open probe and closes it (DESIGN.md section 4).
            breaker = BreakerConfig(threshold=v["breaker_threshold"], open_s=v["breaker_open_s"],
                                    probe_timeout_s=max(v["probe_timeout_s"],
                                                        v["call_timeout_s"]))
        if section == "questdb":
            retry = tuple(v["retry_delays_s"])
        if v["max_attempts"] < 1:
            raise ConfigError(f"{section}.max_attempts in {self.source}: must be >= 1")
        if v["jitter"] > 1:
            raise ConfigError(f"{section}.jitter in {self.source}: must be between 0 and 1")
        return ActorSettings(
            backoff_base_s=v["backoff_base_s"],
            backoff_factor=v["backoff_factor"],
            max_attempts=v["max_attempts"],
            jitter=v["jitter"],
            health_interval_s=v["health_interval_s"],
            probe_timeout_s=v["probe_timeout_s"],
            call_timeout_s=v["call_timeout_s"],
            connect_timeout_s=v["connect_timeout_s"],
            shutdown_timeout_s=v["shutdown_timeout_s"],
            queue_limit=v["queue_limit"],
            stable_s=v["stable_s"],
            retry_delays_s=retry,
            breaker=breaker,
        )
