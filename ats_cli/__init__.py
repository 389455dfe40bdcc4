"""The ``ats`` command line (typer): data, train, evaluate, walk-forward, tune, gate, serve, status."""
