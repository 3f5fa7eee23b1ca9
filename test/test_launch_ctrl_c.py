"""
``ros2 launch rrto_ros offload.launch.py`` stopped by a terminal's Ctrl-C: every process exits 0.

A terminal's Ctrl-C sends SIGINT to every process of the foreground group
(launch and all its nodes), and ``ros2 launch`` then forwards another SIGINT
to each node.  The test runs the launch in its own process group, waits until
it offloads, sends SIGINT to the group, then again, and checks that launch
and every node finished cleanly: exit 0, no traceback, no abort, nothing left
running.  Needs the package installed (``colcon build``, ``source
install/setup.bash``) and the ``ros2`` command; skipped without them.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
pytest.importorskip('launch_ros')
if shutil.which('ros2') is None:
    pytest.skip('needs the ros2 command (a ROS 2 install)', allow_module_level=True)

from diagnostic_msgs.msg import DiagnosticStatus  # noqa: E402
from launch_testing_helpers import LaunchSetup, STOP_TIMEOUTS  # noqa: E402
from ros_testing import Listener  # noqa: E402

from rrto_ros.latency import parse_values  # noqa: E402
from rrto_ros.nodes import messages as m  # noqa: E402

NODES = ('server_node', 'camera_sim', 'offload_node', 'bandwidth_monitor')
pytestmark = [pytest.mark.launch_test, pytest.mark.slow]


def test_a_terminals_double_ctrl_c_stops_the_launch_and_every_node_cleanly(tmp_path):
    setup = LaunchSetup()
    log = tmp_path / 'launch.log'
    with open(log, 'wb') as out:
        launch = subprocess.Popen(
            ['ros2', 'launch', 'rrto_ros', 'offload.launch.py', f'server:={setup.endpoint}',
             f'config:={setup.offload_config}', f'server_config:={setup.server_config}',
             *(f'{name}:={value}' for name, value in STOP_TIMEOUTS.items())],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    listener = Listener(setup.domain_id)
    try:
        latency = listener.subscribe(DiagnosticStatus, '/rrto/latency', m.LATENCY_QOS)
        listener.wait_for(
            lambda: any(parse_values(m.values_of(s))['result'] == 'offloaded' for s in latency),
            300, 'an offloaded inference', lambda: log.read_text(errors='replace'))
        # every lifecycle transition launch requested is done: a Ctrl-C while launch_ros
        # still waits for one makes launch itself exit 1 (its rclpy context is shut down
        # under the pending call; README, l7 2026-12-01: 2 of 10 at 2-5 s), whatever the nodes do
        listener.wait_for(lambda: 'active: measuring the link' in log.read_text(errors='replace'),
                          120, 'bandwidth_monitor active', lambda: log.read_text(errors='replace'))
        os.killpg(launch.pid, signal.SIGINT)   # the terminal: launch and every node
        time.sleep(0.05)
        os.killpg(launch.pid, signal.SIGINT)   # a second Ctrl-C, while they stop
        assert launch.wait(120) == 0, log.read_text(errors='replace')
    finally:
        listener.close()
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
            launch.wait(10)
    out = log.read_text(errors='replace')
    for node in NODES:
        assert f'[{node}-' in out and 'process has finished cleanly' in out, out
    assert out.count('process has finished cleanly') == len(NODES), out
    for word in ('Traceback', 'terminate called', 'never retrieved', 'process has died',
                 'KeyboardInterrupt'):
        assert word not in out, out
    # no orphan left in the group (helpers of a node, e.g. the server's sandbox forkserver,
    # notice their parent's exit within a moment)
    deadline = time.monotonic() + 15
    while _group(launch.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group(launch.pid), _group(launch.pid)


def _group(pgid: int) -> list[str]:
    """Return the command lines of the processes still in process group ``pgid``."""
    left = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            if os.getpgid(int(pid)) == pgid:
                left.append(open(f'/proc/{pid}/cmdline', 'rb').read().replace(b'\0', b' ')
                            .decode(errors='replace')[:200])
        except (OSError, ProcessLookupError):
            pass
    return left
