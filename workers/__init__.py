"""Workers: what runs inside Ray tasks and actors. Reading and decoding inputs
(``read``), the per-item compress/decompress steps (``compress``, ``decompress``), writing
bitstreams and manifest parts (``write``, ``manifest``), and the Ray actor that runs them
over one shard at a time (``actor``)."""
