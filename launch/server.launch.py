"""
Run rrto_server on a GPU machine as a ROS node: ``ros2 launch rrto_ros server.launch.py``.

``server_node`` (a lifecycle node, configured and activated by the launch
unless ``activate:=false``) serves on ``bind`` (default: every interface,
port 5555) with the parameters in ``config`` (default: the package's
``config/server.yaml``) and publishes its counters on ``/diagnostics``.
``bind``, ``device``, ``store`` and ``keys`` (the CURVE key directory from
``rrto-keys``: required when ``bind`` is not loopback, see
``docs/security.md``) override the config file only when given.
Without ROS on the GPU machine, ``python -m rrto_server --bind
tcp://0.0.0.0:5555`` serves the same.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.substitutions import FindPackageShare

from rrto_ros.nodes.launching import managed_node


def _server(context):
    overrides = {name: LaunchConfiguration(name).perform(context)
                 for name in ('bind', 'device', 'store', 'keys')}
    overrides = {k: v for k, v in overrides.items() if v}
    activate = LaunchConfiguration('activate').perform(context) == 'true'
    return managed_node('server_node', [LaunchConfiguration('config')] +
                        ([overrides] if overrides else []), activate)


def generate_launch_description():
    share = FindPackageShare('rrto_ros')
    return LaunchDescription([
        DeclareLaunchArgument('bind', default_value='tcp://0.0.0.0:5555',
                              description='ZeroMQ endpoint to serve on'),
        DeclareLaunchArgument('device', default_value='',
                              description="auto | cpu | cuda | cuda:N ('' = from config)"),
        DeclareLaunchArgument('store', default_value='',
                              description="model store directory ('' = from config)"),
        DeclareLaunchArgument('keys', default_value='',
                              description="CURVE key directory from rrto-keys ('' = from "
                                          'config)'),
        DeclareLaunchArgument(
            'config', default_value=PathJoinSubstitution([share, 'config', 'server.yaml']),
            description='server_node parameters'),
        DeclareLaunchArgument(
            'activate', default_value='true', choices=['true', 'false'],
            description='configure and activate server_node (false: leave it unconfigured)'),
        OpaqueFunction(function=_server),
    ])
