"""jmat's benchmarks: ``python -m benchmarks`` (or ``python -m jmat bench``), from a checkout.

Not part of the jmat wheel: install the bench extra in a source checkout
(``pip install -e '.[bench]'``). One module per concern:

* the suites: ``products`` (products, eager, dtypes), ``family``, ``attention``
  (attention, memory), ``flex``, each defining a :class:`benchmarks.spec.SuiteSpec`
  per suite (how to measure it, its README summary, its plot), registered in ``SUITES``
  of ``__main__.py``; ``accelerators`` (the flex and attention suites on a GPU or TPU:
  jmat's Pallas kernels against torch.compile, cuDNN or splash attention);
  ``ring_attention`` (per-device memory on 8 simulated devices, run on its own);
  ``memory`` (one fresh process per memory point);
* measuring: ``timing`` (interleaved rounds, medians; every timed figure goes through
  it), ``competitors`` (how each library is called and waited on), ``machine``
  (what was measured on, and the accelerators' peak TFLOP/s);
* reporting, one job each: ``derive`` (derived figures), ``markdown`` (results.md),
  ``plots`` (the PNGs), ``readme`` (the README block) and ``report`` (writes the files).
"""
