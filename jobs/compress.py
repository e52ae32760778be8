"""The compress job: every input of a spec at its target, as one incremental run (or a budget job).

    ratefit compress INPUT OUTPUT --target-bpp 0.5
    python -m ratefit.jobs.compress --spec job.yaml               # e.g. under `ray job submit`
    ratefit.jobs.compress.run(JobSpec(...))                        # from Python

All three build one JobSpec and call ``run``: plan → shards → pool → manifest → _SUCCESS
(``python -m ratefit.jobs.recompress`` is the same entrypoint under its old name). A plain job
is one incremental run (``jobs/incremental.py``): it plans only the inputs that are new or
changed since the runs before it, so the same command, run nightly, keeps a growing archive
compressed, and a killed run is finished by the next. A budget job (``jobs/budget.py``) runs
its probe, encode and correction passes.
"""

from __future__ import annotations

import sys
from typing import Any

from ratefit.jobs import budget, incremental
from ratefit.jobs.spec import JobSpec, SpecError


def run(spec: JobSpec) -> dict[str, Any]:
    """Compress every input of ``spec`` and return the ``_SUCCESS`` summary."""
    if spec.kind != "compress":
        raise SpecError("compress.run needs a spec of kind 'compress'")
    # The codec is built on the workers only: the pool waits for them to start and turns a
    # codec that cannot be built (bad options, missing weights) into one JobError, before
    # anything is written to OUTPUT. The driver never loads a model.
    if spec.is_budget:
        return budget.run(spec)
    return incremental.run(spec)


if __name__ == "__main__":
    from ratefit.jobs.cli import main

    sys.exit(main(["compress", *sys.argv[1:]], prog="python -m ratefit.jobs.compress"))
