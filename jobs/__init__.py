"""Jobs: the validated job spec, planning (listing and sharding), the shard runner, the
entrypoints ``python -m ratefit.jobs.recompress`` / ``decompress`` and the ``ratefit`` CLI."""
