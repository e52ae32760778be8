"""Entrypoint of the decompression job: every ``*.rfic`` under INPUT back to a PNG at the
mirrored path under OUTPUT, with its own manifest and ``_SUCCESS``.

    python -m ratefit.jobs.decompress INPUT OUTPUT
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ratefit.codecs.container import SUFFIX
from ratefit.jobs.plan import iter_folder, shard
from ratefit.jobs.recompress import add_common_arguments, add_weights_argument, print_summary, spec_from_args
from ratefit.jobs.runner import run_shards
from ratefit.jobs.spec import JobSpec, SpecError, weights_options
from ratefit.workers.decompress import DecompressConfig
from ratefit.workers.manifest import DECOMPRESS_SCHEMA


def run(spec: JobSpec) -> dict[str, Any]:
    """Decompress every container under ``spec.input``; returns the ``_SUCCESS`` summary."""
    if spec.kind != "decompress":
        raise SpecError("decompress.run needs a spec of kind 'decompress'")
    config = DecompressConfig(output=spec.output, storage_options=spec.storage_options,
                              codec_options={spec.codec: spec.codec_kwargs()} if spec.codec_options else {},
                              learned_options=weights_options({}, spec.weights, spec.storage_options),
                              max_pixels=spec.max_pixels)
    items = iter_folder(spec.input, (SUFFIX,), spec.storage_options, skip_url=spec.output)
    return run_shards(spec, shard(items, spec.shard_size), config, DECOMPRESS_SCHEMA)


def add_decompress_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", nargs="?", help="folder holding .rfic files (a compress OUTPUT)")
    p.add_argument("output", nargs="?", help="folder for the restored PNGs")
    p.add_argument("--max-pixels", type=int, help="refuse containers claiming more pixels than this "
                                                  "(checked before decoding; default 100 MP)")
    add_weights_argument(p)
    add_common_arguments(p)


def spec_for(args: argparse.Namespace) -> JobSpec:
    args.spec = None
    return spec_from_args(args, kind="decompress")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ratefit.jobs.decompress", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_decompress_arguments(p)
    args = p.parse_args(argv)
    from ratefit.jobs.cli import run_guarded

    def go() -> int:
        spec = spec_for(args)
        print_summary(run(spec), spec.output)
        return 0

    return run_guarded(go)


if __name__ == "__main__":
    sys.exit(main())
