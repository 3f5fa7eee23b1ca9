"""What the launch tests share: private domain, free port, small configs in a temp dir."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml
from ros_testing import new_domain_id
from rrto_testing import free_port

REPO = Path(__file__).resolve().parents[1]
# launch escalates SIGINT to SIGTERM, then SIGKILL, after 5 s each by default; a node that
# exits cleanly may need longer than that on a loaded 2-core machine (interpreter teardown)
STOP_TIMEOUTS = {'sigterm_timeout': '30', 'sigkill_timeout': '30'}


class LaunchSetup:
    """A domain id, a server endpoint, and the package's YAML made small and local."""

    def __init__(self):
        self.domain_id = new_domain_id()
        os.environ['ROS_DOMAIN_ID'] = str(self.domain_id)   # launched processes inherit it
        os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
        self.endpoint = f'tcp://127.0.0.1:{free_port()}'
        self.dir = Path(tempfile.mkdtemp(prefix='rrto-launch-test-'))
        self.offload_config = self._write('offload.yaml', {
            # timeout_ms stays the shipped default (auto): no tuning for a CPU server
            'offload_node': {'model': 'python:rrto_ros.zoo:keypoint_net', 'resize_height': 64,
                             'resize_width': 64, 'connect_timeout_ms': 300.0,
                             'export_cache': str(self.dir / 'exports')},
            'camera_sim': {'width': 96, 'height': 72, 'rate_hz': 8.0},
            'bandwidth_monitor': {'probe_rate_hz': 4.0}})
        self.server_config = self._write('server.yaml', {
            'server_node': {'store': str(self.dir / 'store'), 'device': 'cpu',
                            'diagnostics_period_s': 0.5}})

    def _write(self, name: str, changes: dict) -> str:
        doc = yaml.safe_load((REPO / 'config' / name).read_text())
        for node, values in changes.items():
            doc[node]['ros__parameters'].update(values)
        path = self.dir / name
        path.write_text(yaml.safe_dump(doc))
        return str(path)


def package_launch(file_name: str, arguments: dict):
    """Return the description that includes ``share/rrto_ros/launch/<file_name>``, then
    marks the test ready (what ``generate_test_description`` returns first)."""
    import launch
    import launch_testing.actions
    from launch.actions import IncludeLaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource
    from launch.substitutions import PathJoinSubstitution
    from launch_ros.substitutions import FindPackageShare

    include = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(
            PathJoinSubstitution([FindPackageShare('rrto_ros'), 'launch', file_name])),
        launch_arguments={**STOP_TIMEOUTS, **arguments}.items())
    return launch.LaunchDescription([include, launch_testing.actions.ReadyToTest()])
