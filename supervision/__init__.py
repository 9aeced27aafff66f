"""mt5-supervisor: the generic supervision core."""
