"""
launch_testing: ``server.launch.py activate:=false`` leaves server_node to an integrator.

The test walks it through the lifecycle as ``ros2 lifecycle set`` would:
unconfigured (no socket) -> configure -> inactive (still no socket) ->
activate (serves, publishes /diagnostics) -> deactivate (unbinds) ->
activate again.  Needs the package installed (``colcon build``,
``source install/setup.bash``) and launch_testing; skipped where
launch_testing is not importable.
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
        'bind': setup.endpoint, 'config': setup.server_config, 'activate': 'false'}),
        {'setup': setup})


class TestServerLifecycle(unittest.TestCase):

    def test_transitions_bind_and_unbind_and_publish_only_when_active(self, proc_output, setup):
        listener = Listener(setup.domain_id)
        try:
            diagnostics = listener.subscribe(DiagnosticArray, '/diagnostics',
                                             m.DIAGNOSTICS_QOS)
            self.assertEqual(listener.lifecycle('server_node'), 'unconfigured')
            self.assertIsNone(hello(setup.endpoint, timeout_ms=500))
            self.assertEqual(listener.lifecycle('server_node', 'configure'), 'inactive')
            self.assertIsNone(hello(setup.endpoint, timeout_ms=500))
            self.assertEqual(listener.lifecycle('server_node', 'activate'), 'active')
            proc_output.assertWaitFor(f'active: serving on {setup.endpoint}',
                                      process='server_node', timeout=60)
            reply = hello(setup.endpoint, timeout_ms=5000)
            self.assertEqual((reply['kind'], reply['device']), ('ok', 'cpu'))
            status = listener.wait_for(
                lambda: next((s for a in diagnostics for s in a.status
                              if s.name == 'server_node: rrto_server'), None),
                60, 'server_node on /diagnostics')
            self.assertEqual(dict(m.values_of(status))['endpoint'], setup.endpoint)
            self.assertEqual(listener.lifecycle('server_node', 'deactivate'), 'inactive')
            self.assertIsNone(hello(setup.endpoint, timeout_ms=500))
            self.assertEqual(listener.lifecycle('server_node', 'activate'), 'active')
            self.assertEqual(hello(setup.endpoint, timeout_ms=5000)['kind'], 'ok')
        finally:
            listener.close()


@launch_testing.post_shutdown_test()
class TestServerLaunchShutdown(unittest.TestCase):

    def test_server_exits_cleanly(self, proc_info, proc_output):
        launch_testing.asserts.assertExitCodes(proc_info)
        for word in ('Traceback', 'terminate called', 'never retrieved'):
            self.assertNotIn(word, ''.join(o.text.decode() for o in proc_output))
