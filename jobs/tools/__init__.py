"""Tools beside the job path: the trainer (``train``, ``train_fast``), ``ratefit eval``
(``evaluate``), the decoder fuzzer (``fuzz``), the benchmarks (``bench``, ``bench_planner``),
``ratefit export-zoo`` (``export_zoo``) and the demo (``demo``). They use the job path; the job
path never uses them."""
