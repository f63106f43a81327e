"""The storage layer: all SQL lives here, in plain SQL with ``$n`` parameters."""
