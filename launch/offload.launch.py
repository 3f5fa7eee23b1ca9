"""
Offload a perception model from this robot: ``ros2 launch rrto_ros offload.launch.py``.

Starts ``offload_node`` and ``bandwidth_monitor`` with ``config`` (default:
the package's ``config/offload.yaml``), and by default a local ``server_node``
(``start_local_server:=true``, configured by ``server_config``) and the
``camera_sim`` frame generator (``camera_sim:=true``), so the command alone
shows latency on ``/rrto/latency``.  For a real robot and a GPU server::

    ros2 launch rrto_ros offload.launch.py server:=tcp://gpu-host:5555 \\
        start_local_server:=false camera_sim:=false config:=/path/to/my_offload.yaml

``server``, ``directory`` (a fleet directory: ``python -m rrto_fleet``),
``model`` and ``plan_table`` override the config file only when given;
``model:=python:rrto_ros.zoo:keypoint_net
plan_table:=config/plans/keypoint_net_224.json`` runs the shipped hybrid plans.  With a
local server, ``server`` is also the endpoint that server binds.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare


def _nodes(context):
    config = LaunchConfiguration('config').perform(context)
    server_config = LaunchConfiguration('server_config').perform(context)
    server = LaunchConfiguration('server').perform(context)
    model = LaunchConfiguration('model').perform(context)
    plan_table = LaunchConfiguration('plan_table').perform(context)
    directory = LaunchConfiguration('directory').perform(context)
    link = {'server': server} if server else {}
    offload = dict(link, **({'model': model} if model else {}),
                   **({'plan_table': plan_table} if plan_table else {}),
                   **({'directory': directory} if directory else {}))
    return [
        Node(package='rrto_ros', executable='server_node', name='server_node',
             parameters=[server_config] + ([{'bind': server}] if server else []),
             condition=IfCondition(LaunchConfiguration('start_local_server')),
             output='screen'),
        Node(package='rrto_ros', executable='camera_sim', name='camera_sim',
             parameters=[config], condition=IfCondition(LaunchConfiguration('camera_sim')),
             output='screen'),
        Node(package='rrto_ros', executable='offload_node', name='offload_node',
             parameters=[config] + ([offload] if offload else []), output='screen'),
        Node(package='rrto_ros', executable='bandwidth_monitor', name='bandwidth_monitor',
             parameters=[config] + ([link] if link else []), output='screen'),
    ]


def generate_launch_description():
    share = FindPackageShare('rrto_ros')
    return LaunchDescription([
        DeclareLaunchArgument(
            'server', default_value='',
            description="rrto_server endpoint, e.g. tcp://gpu-host:5555 ('' = from config)"),
        DeclareLaunchArgument(
            'directory', default_value='',
            description="fleet directory endpoint, e.g. tcp://gpu-head:5600 ('' = from config)"),
        DeclareLaunchArgument(
            'model', default_value='',
            description="python:package.module:factory or a model file ('' = from config)"),
        DeclareLaunchArgument(
            'plan_table', default_value='',
            description='hybrid plan table from rrto-plan, e.g. '
                        "config/plans/keypoint_net_224.json (share-relative works; '' = config)"),
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
        OpaqueFunction(function=_nodes),
    ])
