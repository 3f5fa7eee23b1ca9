"""
Offload a perception model from this robot: ``ros2 launch rrto_ros offload.launch.py``.

Starts ``offload_node`` and ``bandwidth_monitor`` with ``config`` (default:
the package's ``config/offload.yaml``), and by default a local ``server_node``
(``start_local_server:=true``, configured by ``server_config``) and the
``camera_sim`` frame generator (``camera_sim:=true``), so the command alone
shows latency on ``/rrto/latency``.  ``offload_node``, ``bandwidth_monitor``
and ``server_node`` are lifecycle nodes: the launch configures and activates
them (``activate:=false`` leaves them unconfigured for ``ros2 lifecycle`` or a
lifecycle manager).  For a real robot and a GPU server::

    ros2 launch rrto_ros offload.launch.py server:=tcp://gpu-host:5555 \\
        start_local_server:=false camera_sim:=false config:=/path/to/my_offload.yaml

``server``, ``directory`` (a fleet directory: ``python -m rrto_fleet``),
``model``, ``plan_table``, ``timeout_ms``, ``precision``,
``priority``, ``deadline_ms`` and ``codec`` override the config file only
when given; ``model:=python:rrto_ros.zoo:keypoint_net
plan_table:=config/plans/keypoint_net_224.json`` runs the shipped hybrid plans.
With a local server, ``server`` is also the endpoint that server binds.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from rrto_ros.nodes.launching import managed_node

# offload_node parameters a launch argument may override, and their ROS types
OVERRIDES = {'model': str, 'plan_table': str, 'directory': str, 'timeout_ms': float,
             'precision': str,
             'priority': int, 'deadline_ms': float, 'codec': str}


def _given(context, name: str) -> str:
    return LaunchConfiguration(name).perform(context)


def _nodes(context):
    config = _given(context, 'config')
    server = _given(context, 'server')
    activate = _given(context, 'activate') == 'true'
    link = {'server': server} if server else {}
    offload = dict(link, **{name: kind(_given(context, name)) for name, kind in OVERRIDES.items()
                            if _given(context, name)})
    return [
        *managed_node('server_node', [_given(context, 'server_config')] +
                      ([{'bind': server}] if server else []), activate,
                      condition=IfCondition(LaunchConfiguration('start_local_server'))),
        Node(package='rrto_ros', executable='camera_sim', name='camera_sim',
             parameters=[config], condition=IfCondition(LaunchConfiguration('camera_sim')),
             output='screen'),
        *managed_node('offload_node', [config, offload], activate),
        *managed_node('bandwidth_monitor', [config, link], activate),
    ]


def generate_launch_description():
    share = FindPackageShare('rrto_ros')
    optional = {
        'server': "rrto_server endpoint, e.g. tcp://gpu-host:5555 ('' = from config)",
        'directory': "fleet directory endpoint, e.g. tcp://gpu-head:5600 ('' = from config)",
        'model': "python:package.module:factory or a model file ('' = from config)",
        'plan_table': 'hybrid plan table from rrto-plan, e.g. '
                      "config/plans/keypoint_net_224.json (share-relative works; '' = config)",
        'timeout_ms': "slower calls run locally, e.g. 500.0; 0 = auto ('' = from config)",
        'precision': "fp32 | fp16 | bf16 on the server ('' = from config)",
        'priority': "-100..100, higher first on the server ('' = from config)",
        'deadline_ms': "server deadline per inference, 0 = none ('' = from config)",
        'codec': "raw | lz4 | zstd | jpeg[:Q] | auto | auto_lossy ('' = from config)",
    }
    return LaunchDescription([
        *(DeclareLaunchArgument(name, default_value='', description=text)
          for name, text in optional.items()),
        DeclareLaunchArgument(
            'config', default_value=PathJoinSubstitution([share, 'config', 'offload.yaml']),
            description='parameters of offload_node, bandwidth_monitor and camera_sim'),
        DeclareLaunchArgument(
            'server_config',
            default_value=PathJoinSubstitution([share, 'config', 'server.yaml']),
            description='parameters of the local server_node'),
        DeclareLaunchArgument(
            'start_local_server', default_value='true', choices=['true', 'false'],
            description='run rrto_server on this machine (server_node)'),
        DeclareLaunchArgument(
            'camera_sim', default_value='true', choices=['true', 'false'],
            description='publish synthetic frames (camera_sim) instead of a real camera'),
        DeclareLaunchArgument(
            'activate', default_value='true', choices=['true', 'false'],
            description='configure and activate the lifecycle nodes (false: leave them '
                        'unconfigured for ros2 lifecycle or a lifecycle manager)'),
        OpaqueFunction(function=_nodes),
    ])
