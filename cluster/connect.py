"""Connecting to Ray: an embedded local Ray by default, a cluster with ``address``.

Under ``ray job submit`` the entrypoint finds its cluster through ``RAY_ADDRESS``, which
Ray sets; nothing needs to be passed. The embedded Ray binds to 127.0.0.1 only and never
reports usage statistics (no traffic leaves the machine).
"""

from __future__ import annotations

import os
from typing import Any

LOOPBACK = "127.0.0.1"
_embedded = False   # whether this process's Ray is one connect() started here (it never gains nodes)


def quiet_ray_environment() -> None:
    """Environment every ratefit process sets before Ray starts."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def loopback_only() -> None:
    """Keep an embedded, single-machine Ray on 127.0.0.1.

    Ray replaces a 127.0.0.1 node address by the machine's routable address unless
    multi-node support is off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``); an embedded Ray
    never has other nodes, so it turns it off. The variable is read when Ray is imported,
    so the already-imported constant is set too; child processes inherit the variable.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def connect(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Make sure this process is connected to Ray; return True if this call started it.

    ``address`` may be ``auto``, ``HOST:PORT`` or ``ray://HOST:10001``. With no address and
    no ``RAY_ADDRESS``, a local Ray starts inside this process tree.
    """
    global _embedded
    quiet_ray_environment()
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or None, **kwargs)
        _embedded = False
    else:
        loopback_only()
        # address="local" always starts a fresh Ray here rather than joining a `ray start`
        # cluster found on this machine: joining one is what --address is for.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address=LOOPBACK, **kwargs)
        _embedded = True
    return True


def embedded() -> bool:
    """Whether this process is connected to an embedded Ray that ``connect`` started: a single
    node that no other node can join, so asking it for resources it lacks only waits forever."""
    import ray

    return _embedded and ray.is_initialized()


def alive_nodes() -> list[tuple[str, dict[str, float]]]:
    """(node id, total resources) of every node of the cluster that is alive now (one GCS call)."""
    import ray

    return [(str(n["NodeID"]), {k: float(v) for k, v in (n.get("Resources") or {}).items()})
            for n in ray.nodes() if n.get("Alive")]

