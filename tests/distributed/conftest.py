"""The multi-process worker is a script, not a test module: importing it (as pytest's
--doctest-modules would) sets its own 4-device XLA_FLAGS in the collecting process."""

collect_ignore = ["multiprocess_worker.py"]
