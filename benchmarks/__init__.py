"""The batchfeed benchmark: every way of feeding a training loop, side by side, in one run.

It sits beside the package, not in it (as torchdata's ``benchmarks/`` does): run it from a
checkout with ``python -m benchmarks`` (``--help`` lists the workloads; ``batchfeed bench``
forwards to it in a source checkout).  Sections, each measured and printed by its own module:

- ``loaders``: the tabular, image and large workloads: the raw in-process copy limit, a naive
  loop, torch's DataLoader per-sample and batched (``inprocess``), the peers (``peers``:
  torchdata nodes, SPDL), and batchfeed over tcp, ipc and the fast path (``served``);
- ``tokens`` (throughput) and ``tokens_memory``: packed language-model rows;
- ``jpeg`` (with ``jpeg_data``, ``jpeg_torch``, ``jpeg_peers``, ``jpeg_report``): decode +
  crop from a folder;
- ``shards`` (with ``shards_check``): one job over shard servers;  ``stalls``: epoch-boundary
  waits;
- ``ray_bench`` (with ``ray_peers``): the tabular and JPEG jobs through Ray Data and through
  batchfeed on Ray.

Shared by all: ``common`` (rows, guards, ratios, goals, tables), ``measure`` (the consumer),
``servers`` (starting, stopping and probing servers), ``pool`` (client processes),
``workloads`` (options and datasets), ``report`` (header, JSON), ``run`` (the whole run).
"""
