"""Runtime environments for jobs submitted to a cluster.

A cluster's nodes must have ratefit installed (in the image or the launcher's
``setup_commands``); the runtime env only carries what differs per job: environment
variables such as S3 settings, never secrets in plain text where a secret store exists.
"""

from __future__ import annotations

import json
import os

FORWARDED = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "FSSPEC_S3_ENDPOINT_URL")


def runtime_env(forward: tuple[str, ...] = FORWARDED) -> dict:
    """A runtime_env dict forwarding the given variables that are set here, plus quiet Ray."""
    env_vars = {k: os.environ[k] for k in forward if k in os.environ}
    env_vars["RAY_USAGE_STATS_ENABLED"] = "0"
    return {"env_vars": env_vars}


if __name__ == "__main__":   # python -m ratefit.cluster.runtime_env > env.json; ray job submit --runtime-env env.json
    print(json.dumps(runtime_env()))
