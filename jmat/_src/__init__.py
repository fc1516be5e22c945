"""jmat's implementation; the public surface is ``jmat`` and its namespace modules."""
