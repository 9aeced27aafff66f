"""The MetaTrader 5 terminal actor, its backends and the terminal simulator."""
