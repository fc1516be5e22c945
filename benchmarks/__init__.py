"""jmat's benchmarks: ``python -m benchmarks`` (or ``python -m jmat bench``).

One module per concern: ``timing`` (interleaved rounds, medians), ``competitors``
(how each library is called and waited on), ``products`` / ``family`` /
``attention`` / ``memory`` (the suites), ``machine`` (what was measured on) and
``report`` (JSON, Markdown, plots, the README block).
"""
