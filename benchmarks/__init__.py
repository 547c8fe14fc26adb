"""relay's benchmark suite.

* ``python -m benchmarks.run``: relay against direct access, nginx and the
  AI gateways people would choose instead, on the same machine in the same
  run; writes ``docs/benchmarks.md`` and ``docs/benchmarks.png``.
* ``python -m benchmarks.run --micro``: pytest-benchmark micro-benchmarks of
  the hot-path pieces, compiled and pure.

See ``benchmarks/README.md``.
"""
