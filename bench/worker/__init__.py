"""The worker benchmark (``python bench/worker_bench.py``): a harness and one module per measurement.

- :mod:`bench.worker.harness`: runs the measurements in order on a quiet machine, keeps every result;
- :mod:`bench.worker.data`: the simulated bank, the model, the records on the wire;
- :mod:`bench.worker.topic`: the broker, the input topic, committed offsets;
- :mod:`bench.worker.process`: a worker as a child process, watched from outside;
- measurements: :mod:`~bench.worker.ceiling`, :mod:`~bench.worker.throughput` (one worker, and N processes),
  :mod:`~bench.worker.naive`, :mod:`~bench.worker.latency`, :mod:`~bench.worker.scoring`,
  :mod:`~bench.worker.profiling`;
- :mod:`bench.worker.report`: the markdown tables.

Importing this package loads nothing heavy; each module imports what it measures with.
"""
