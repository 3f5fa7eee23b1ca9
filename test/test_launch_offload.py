"""
launch_testing: ``offload.launch.py`` alone activates its lifecycle nodes and offloads steadily.

With the shipped ``timeout_ms`` (auto) and a local CPU server, no tuning; the
robot computes nothing beside that server (the launch's ``fallback:=skip``).
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
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from launch_testing_helpers import LaunchSetup, package_launch  # noqa: E402
from ros_testing import Listener  # noqa: E402
from std_msgs.msg import Float32MultiArray  # noqa: E402

from rrto_ros.latency import parse_values  # noqa: E402
from rrto_ros.nodes import messages as m  # noqa: E402


@pytest.mark.launch_test
@launch_testing.ready_to_test_action_timeout(60)
@launch_testing.markers.keep_alive
def generate_test_description():
    setup = LaunchSetup()
    return (package_launch('offload.launch.py', {
        'server': setup.endpoint, 'config': setup.offload_config,
        'server_config': setup.server_config}), {'setup': setup})


class TestOffloadLaunch(unittest.TestCase):

    def test_every_node_starts_and_the_lifecycle_nodes_become_active(self, proc_output, setup):
        proc_output.assertWaitFor(f'active: serving on {setup.endpoint}',
                                  process='server_node', timeout=60)
        proc_output.assertWaitFor('publishing 96x72 rgb8 frames', process='camera_sim',
                                  timeout=60)
        proc_output.assertWaitFor('active: offloading keypoint_net', process='offload_node',
                                  timeout=60)
        proc_output.assertWaitFor('active: measuring the link', process='bandwidth_monitor',
                                  timeout=60)
        listener = Listener(setup.domain_id)
        try:
            for node in ('server_node', 'offload_node', 'bandwidth_monitor'):
                self.assertEqual(listener.lifecycle(node), 'active', node)
        finally:
            listener.close()
        proc_output.assertWaitFor('the server has recorded its replay', process='offload_node',
                                  timeout=120)

    def test_latency_outputs_bandwidth_and_diagnostics(self, setup):
        listener = Listener(setup.domain_id)
        try:
            latency = listener.subscribe(DiagnosticStatus, '/rrto/latency', m.LATENCY_QOS)
            heatmaps = listener.subscribe(Float32MultiArray, '/offload_node/output/heatmaps',
                                          m.OUTPUT_QOS)
            link = listener.subscribe(DiagnosticStatus, '/rrto/bandwidth', m.STATUS_QOS)
            diagnostics = listener.subscribe(DiagnosticArray, '/diagnostics',
                                             m.DIAGNOSTICS_QOS)
            record = listener.wait_for(
                lambda: next((r for r in map(parse_values, map(m.values_of, latency))
                              if r['result'] == 'offloaded'), None),
                120, 'an offloaded inference on /rrto/latency')
            self.assertEqual(record['round_trips'], 1)
            self.assertEqual(record['server'], setup.endpoint)
            # with its own server the launch skips what that server cannot serve yet
            # (fallback:=skip): the robot computed nothing beside it
            before = [r['result'] for r in map(parse_values, map(m.values_of, latency))]
            before = before[:before.index('offloaded')]
            self.assertFalse({'local', 'local_fallback'} & set(before), before)
            # steady: once offloading, most of the next 12 records are offloaded (margin for
            # a loaded 2-core machine, where server and robot share the cores)
            first = len(latency)
            listener.wait_for(lambda: len(latency) >= first + 12, 120, '12 more records')
            results = [parse_values(m.values_of(s))['result'] for s in latency[first:first + 12]]
            self.assertGreaterEqual(results.count('offloaded'), 9, results)
            listener.wait_for(lambda: heatmaps, 10, 'outputs')
            self.assertEqual([d.size for d in heatmaps[-1].layout.dim], [1, 17, 16, 16])
            health = listener.wait_for(
                lambda: link and dict(m.values_of(link[-1]))['health'], 20, 'link health')
            self.assertEqual(health, 'ok')
            listener.wait_for(
                lambda: {s.name for a in diagnostics for s in a.status} >= {
                    'server_node: rrto_server', 'offload_node: keypoint_net'},
                20, 'server and offload node on /diagnostics')
        finally:
            listener.close()


@launch_testing.post_shutdown_test()
class TestOffloadLaunchShutdown(unittest.TestCase):

    def test_every_node_exits_cleanly(self, proc_info, proc_output):
        launch_testing.asserts.assertExitCodes(proc_info)
        for word in ('Traceback', 'terminate called', 'never retrieved'):
            self.assertNotIn(word, ''.join(o.text.decode() for o in proc_output))
