"""Jobs: the spec, planning, the job builder, the pool and runner, the compress / budget /
decompress jobs and the ``ratefit`` CLI; tools (train, eval, fuzz, bench) beside them.
``docs/architecture.md`` is the map."""
