"""The decompress job: every ``*.rfic`` under INPUT back to a PNG at the mirrored path under
OUTPUT, with its own manifest and ``_SUCCESS``; resumes by shard (``jobs/build.py``).

    ratefit decompress INPUT OUTPUT
    python -m ratefit.jobs.decompress INPUT OUTPUT
"""

from __future__ import annotations

import sys
from typing import Any

from ratefit.jobs.build import build_pass, plan_shards
from ratefit.jobs.runner import run_shards
from ratefit.jobs.spec import JobSpec, SpecError


def run(spec: JobSpec) -> dict[str, Any]:
    """Decompress every container under ``spec.input``; returns the ``_SUCCESS`` summary."""
    if spec.kind != "decompress":
        raise SpecError("decompress.run needs a spec of kind 'decompress'")
    return run_shards(spec, plan_shards(spec), build_pass(spec, "decompress"))


if __name__ == "__main__":
    from ratefit.jobs.cli import main

    sys.exit(main(["decompress", *sys.argv[1:]], prog="python -m ratefit.jobs.decompress"))
