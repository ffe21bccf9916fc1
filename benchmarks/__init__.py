"""Audit Fleet's load-test harness: ``python -m benchmarks run --quick``.

Modules (one concept each):

* :mod:`benchmarks.load`      realistic event templates, the interleaved run mix, producers
* :mod:`benchmarks.stats`     pure measurement maths: ack times, percentiles, lost/duplicates
* :mod:`benchmarks.monitor`   the outside observer: Redis group sampler, /proc stats, progress
* :mod:`benchmarks.procs`     worker and helper subprocesses, kill -9, rusage
* :mod:`benchmarks.baselines` the raw Redis loop, the store's raw upsert, the naive writer
* :mod:`benchmarks.proxy`     a TCP proxy that can cut a store off and restore it
* :mod:`benchmarks.scenarios` steady, max, burst, crash and outage
* :mod:`benchmarks.report`    JSON, targets, the results table and the PNG plot

See benchmarks/README.md for what is measured, how, and the latest results.
"""

from __future__ import annotations
