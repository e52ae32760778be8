"""The compress entrypoint under its first name, kept because job specs, cluster configs and
scripts in the wild run ``python -m ratefit.jobs.recompress``: the same as
``python -m ratefit.jobs.compress`` (``jobs/compress.py``)."""

from __future__ import annotations

import sys

from ratefit.jobs.compress import run

__all__ = ["run"]

if __name__ == "__main__":
    from ratefit.jobs.cli import main

    sys.exit(main(["compress", *sys.argv[1:]], prog="python -m ratefit.jobs.recompress"))
