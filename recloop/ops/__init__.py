"""Operating recloop on one machine: tooling around the product, which never imports it.

- ``broker``: a local single-node Kafka (KRaft) from Maven Central jars (``recloop kafka``,
  the test suite, the benchmarks and the demo)
- ``demo``: the whole loop as separate processes, watched, with a report (``recloop demo``)
- ``monitor``: the live view of a running loop, written to storage as it goes
- ``report``: learning curves, lag and freshness of a run as PNGs and one HTML page
- ``lag_view`` and ``sim_view``: the tables of ``recloop lag`` and ``recloop sim``
"""
