"""The control channel: JSON-RPC 2.0 over WebSocket (docs/protocol.md).

``jsonrpc`` is the pure protocol layer (parsing, validation, replies); ``server`` runs it
on trio-websocket against a ``Runtime``.
"""
