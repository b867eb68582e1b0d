"""Scale-out: Ray actors that play a round's or a tournament's games (``ray_pool.py``).

``rollout.workers: N`` (and ``rollout.ray_address`` for an existing cluster) turns it on;
``pip install 'parlay[ray]'`` installs Ray."""

from parlay.distributed.ray_pool import DistributedError, RayPool, RemoteAgent

__all__ = ["DistributedError", "RayPool", "RemoteAgent"]
