"""A run: the engine's loop and its stages (preflight, resolve, submit, check, download), each over the store."""
