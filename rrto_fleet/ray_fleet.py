"""
The fleet on Ray: one replica actor per GPU, a named directory actor, restarts on failure.

:func:`start_fleet` places ``replicas`` :class:`ReplicaActor` actors (named
``rrto-replica-N``, each ``num_gpus=1`` by default, spread over the nodes,
restarted without limit when they or their node die) and one
:class:`DirectoryActor` named ``rrto-directory`` on the caller's node that
serves robots over ZeroMQ (:mod:`rrto_fleet.front`) and reaches the replicas
by name (:class:`RayPort`).  Every replica is started with the same server
options, so a replica that comes back elsewhere serves the same store under
the same settings.  Requests never pass through Ray: robots send them to a
replica's endpoint.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rrto_fleet.directory import Directory, Policy, ReplicaDown, WarmError
from rrto_fleet.front import Front, POLL_S
from rrto_fleet.replica import advertised, Replica, WARM_TIMEOUT_S
from rrto_server.server import ServerConfig
from rrto_wire.curve import ClientKeys

DIRECTORY_NAME = 'rrto-directory'
REPLICA_NAME = 'rrto-replica'
NAMESPACE = 'rrto'
LOAD_TIMEOUT_S = 2.0
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def runtime_env() -> dict:
    """Return the Ray runtime environment that makes this package importable in workers."""
    path = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get('PYTHONPATH')) if p)
    return {'env_vars': {'PYTHONPATH': path}}


@ray.remote(max_restarts=-1, max_concurrency=4)
class ReplicaActor:
    """A :class:`~rrto_fleet.replica.Replica` in a Ray actor (threaded: load while warming)."""

    def __init__(self, config: ServerConfig, fleet_key: str | None = None):
        keys = (ClientKeys.load(os.path.join(config.keys, 'server.key'), fleet_key)
                if config.keys else None)
        self.replica = Replica(config, ray.util.get_node_ip_address(), keys)

    def info(self) -> dict:
        return self.replica.info()

    def warm(self, model: str, signature: list, options: dict) -> dict:
        try:
            return self.replica.warm(model, signature, options)
        except WarmError as exc:   # returned, not raised: Ray would wrap it
            return {'error': exc.code, 'message': exc.message}

    def load(self) -> dict:
        return self.replica.load()


class RayPort:
    """A replica actor as the directory's :class:`~rrto_fleet.directory.Port`."""

    def __init__(self, handle, load_timeout_s: float = LOAD_TIMEOUT_S):
        self.handle = handle
        self.load_timeout_s = load_timeout_s

    def load(self) -> dict:
        try:
            return ray.get(self.handle.load.remote(), timeout=self.load_timeout_s)
        except ray.exceptions.RayError as exc:
            raise ReplicaDown(type(exc).__name__) from None

    def warm(self, model: str, signature: list, options: dict) -> dict:
        try:
            reply = ray.get(self.handle.warm.remote(model, signature, options),
                            timeout=WARM_TIMEOUT_S)
        except ray.exceptions.RayError as exc:
            raise ReplicaDown(type(exc).__name__) from None
        if 'error' in reply:
            raise WarmError(reply['error'], reply['message'])
        return reply


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=4)
class DirectoryActor:
    """The directory and its ZeroMQ front in one actor."""

    def __init__(self, replicas: list[str], bind: str, policy: Policy, poll_s: float,
                 keys: str | None = None, fleet_key: str | None = None):
        ports = {name: RayPort(ray.get_actor(name, namespace=NAMESPACE)) for name in replicas}
        self.directory = Directory(ports, policy)
        self.front = Front(self.directory, bind, poll_s, keys, fleet_key).start()
        self.endpoint = advertised(self.front.endpoint, ray.util.get_node_ip_address())

    def address(self) -> str:
        return self.endpoint

    def snapshot(self) -> dict:
        return self.directory.snapshot()

    def poll(self) -> dict:
        """Poll and scale now (tests, tools); return the snapshot."""
        self.directory.poll()
        self.directory.scale()
        return self.directory.snapshot()


@dataclass
class Fleet:
    """Handles of a started fleet; :meth:`stop` ends every actor."""

    directory: object
    replicas: list
    endpoint: str

    def stop(self) -> None:
        for handle in [self.directory, *self.replicas]:
            ray.kill(handle, no_restart=True)


def start_fleet(config: ServerConfig, replicas: int, directory_bind: str,
                gpus_per_replica: float = 1.0, policy: Policy | None = None,
                poll_s: float = POLL_S, timeout_s: float = 120.0,
                fleet_key: str | None = None) -> Fleet:
    """
    Start replicas and the directory on the connected Ray cluster; return once they answer.

    With a CURVE key directory (``config.keys``) the directory's front requires the
    same allow-listed keys as the replicas, and ``fleet_key`` (a client
    ``.key_secret`` allow-listed there) is the key the replicas record with.
    """
    if config.keys and not fleet_key:
        raise ValueError('a fleet with a key directory needs fleet_key: a client .key_secret '
                         "allow-listed there (rrto-keys client, rrto-keys allow)")
    config = dataclasses.replace(config, store=os.path.abspath(config.store))
    names = [f'{REPLICA_NAME}-{i}' for i in range(replicas)]
    handles = [ReplicaActor.options(name=name, namespace=NAMESPACE, num_gpus=gpus_per_replica,
                                    num_cpus=0, scheduling_strategy='SPREAD').remote(
                                        config, fleet_key)
               for name in names]
    ray.get([h.info.remote() for h in handles], timeout=timeout_s)
    # the directory stays on this node: robots are configured with its address
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    directory = DirectoryActor.options(name=DIRECTORY_NAME, namespace=NAMESPACE,
                                       scheduling_strategy=here).remote(
        names, directory_bind, policy or Policy(), poll_s, config.keys, fleet_key)
    endpoint = ray.get(directory.address.remote(), timeout=timeout_s)
    return Fleet(directory, handles, endpoint)
