"""
launch_testing: ``server.launch.py`` serves on its ``bind`` endpoint and reports on /diagnostics.

Needs the package installed (``colcon build``, ``source install/setup.bash``)
and launch_testing; skipped where launch_testing is not importable.
"""

import sys
import unittest
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
launch_testing = pytest.importorskip('launch_testing')

import launch_testing.asserts  # noqa: E402
import launch_testing.markers  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from launch_testing_helpers import LaunchSetup, package_launch  # noqa: E402
from ros_testing import Listener  # noqa: E402
from rrto_testing import hello  # noqa: E402

from rrto_ros.nodes import messages as m  # noqa: E402


@pytest.mark.launch_test
@launch_testing.ready_to_test_action_timeout(60)
@launch_testing.markers.keep_alive
def generate_test_description():
    setup = LaunchSetup()
    return (package_launch('server.launch.py', {
        'bind': setup.endpoint, 'config': setup.server_config}), {'setup': setup})


class TestServerLaunch(unittest.TestCase):

    def test_serves_on_the_bind_endpoint(self, proc_output, setup):
        proc_output.assertWaitFor(f'rrto_server listening on {setup.endpoint}',
                                  process='server_node', timeout=60)
        reply = hello(setup.endpoint, timeout_ms=5000)
        self.assertIsNotNone(reply)
        self.assertEqual(reply['kind'], 'ok')
        self.assertEqual(reply['device'], 'cpu')

    def test_counters_on_diagnostics(self, setup):
        listener = Listener(setup.domain_id)
        try:
            diagnostics = listener.subscribe(DiagnosticArray, '/diagnostics',
                                             m.DIAGNOSTICS_QOS)
            status = listener.wait_for(
                lambda: next((s for a in diagnostics for s in a.status
                              if s.name == 'server_node: rrto_server'), None),
                60, 'server_node on /diagnostics')
            values = dict(m.values_of(status))
            self.assertEqual(values['endpoint'], setup.endpoint)
            self.assertEqual(values['device'], 'cpu')
        finally:
            listener.close()


@launch_testing.post_shutdown_test()
class TestServerLaunchShutdown(unittest.TestCase):

    def test_server_exits_cleanly(self, proc_info):
        launch_testing.asserts.assertExitCodes(proc_info)
