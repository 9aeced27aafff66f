"""Test support, one module per concern.

* ``waiting`` — ``eventually`` and ``in_thread``: the only ways tests wait on state.
* ``actors`` — stand-in resources and actors (``FlakyResource``, ``FlakyActor``), a running
  supervisor, an event ``Recorder``.
* ``inprocess`` — ``open_runtime`` in the test's own trio run, and the in-process WebSocket
  client (``Client``) for the control channel.
* ``e2e`` — a real ``mt5-supervisor run`` subprocess (``RuntimeProcess``) and the end-to-end
  client (``Rpc``), independent of the product's code on purpose.
* ``ws_close`` — reading a WebSocket's close code (both clients).
* Real servers and tools: ``pg_fixtures`` (PostgreSQL), ``questdb_server`` (QuestDB from
  ../shared/questdb), ``mt5linux_server`` (an rpyc server serving the simulator),
  ``browser`` (headless Chromium over CDP), ``small_disk`` (tmpfs mounts), ``db_attack``
  (psql as a hostile local user), ``soak`` (the random fault/restart driver).
"""
