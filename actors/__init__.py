"""Resource actors: each owns one resource; nothing else touches it."""
