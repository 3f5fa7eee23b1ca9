"""Fixtures: an in-process server per test, server processes, zmq contexts."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rrto_testing import ServerProcess  # noqa: E402

from rrto_server.options import ServerConfig  # noqa: E402
from rrto_server.server import Server  # noqa: E402

torch.set_num_threads(2)

_CORE_LOGGERS = ('rrto_ros', 'rrto_server')


@pytest.fixture
def caplog(caplog):
    """Pytest's ``caplog``, also fed by core loggers that stopped propagating.

    A node started earlier in the process routes ``rrto_ros``/``rrto_server`` to ROS with
    ``propagate = False`` (``nodes/log_bridge``); from then on the root handler that
    ``caplog`` listens on sees nothing of theirs, and a test's outcome would depend on which
    tests ran before it.  Loggers that still propagate are left alone (no double records).
    """
    cut = [logger for logger in map(logging.getLogger, _CORE_LOGGERS) if not logger.propagate]
    for logger in cut:
        logger.addHandler(caplog.handler)
    yield caplog
    for logger in cut:
        logger.removeHandler(caplog.handler)


@pytest.fixture
def zmq_ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def make_server(tmp_path):
    """Factory for in-process servers on random loopback ports; all closed after the test."""
    servers = []

    def make(**options) -> Server:
        options.setdefault('bind', 'tcp://127.0.0.1:0')
        options.setdefault('store', str(tmp_path / f'store{len(servers)}'))
        options.setdefault('device', 'cpu')
        server = Server(ServerConfig(**options))
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def server(make_server):
    return make_server()


@pytest.fixture
def server_process(tmp_path):
    """Factory for ``python -m rrto_server`` child processes, stopped after the test."""
    procs = []

    def make(store: Path | None = None, port: int | None = None, *args: str) -> ServerProcess:
        proc = ServerProcess(store or tmp_path / 'store', port, *args)
        procs.append(proc)
        return proc.start()

    yield make
    for proc in procs:
        proc.stop()


@pytest.fixture
def offloaded():
    """Factory for OffloadedModel instances that are closed after the test."""
    from rrto_ros import offload
    models = []

    def make(model, server, **options):
        om = offload(model, server=server, **options)
        models.append(om)
        return om

    yield make
    for om in models:
        om.close()


@pytest.fixture
def domain_id():
    """A ROS domain id of this test alone (see ros_testing)."""
    from ros_testing import new_domain_id
    return new_domain_id()


@pytest.fixture
def ros_nodes(tmp_path, domain_id):
    """Factory for node processes on this test's domain; all stopped after the test."""
    from ros_testing import NodeProcess
    procs = []

    def make(module: str, start: bool = True, ros_args: tuple = (), **params) -> NodeProcess:
        proc = NodeProcess(module, params, domain_id, tmp_path, ros_args)
        procs.append(proc)
        return proc.start() if start else proc

    yield make
    for proc in procs:
        proc.stop()


@pytest.fixture
def listener(domain_id):
    """An rclpy listener on this test's domain, in its own context."""
    from ros_testing import Listener
    lis = Listener(domain_id)
    yield lis
    lis.close()
