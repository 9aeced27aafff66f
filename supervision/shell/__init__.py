"""The product shell: what turns the generic core into mt5-supervisor.

* ``config`` — TOML plus environment overrides, refused with the key and file named;
* ``runtime`` — the default tree assembled from ``actors/`` (cache, embedded database,
  questdb, terminals, event persistence), fault injection, ``open_runtime``;
* ``surface`` — the small protocol the servers below depend on instead of ``Runtime``;
* ``control`` — the WebSocket JSON-RPC 2.0 control channel;
* ``health`` and ``httpserver`` — ``/health``, ``/metrics`` and the operator's page (``web``);
* ``cli`` — the ``mt5-supervisor`` command.

The core (``supervision/`` above this package) never imports anything from here.
"""
