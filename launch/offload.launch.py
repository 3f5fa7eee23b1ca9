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
``model``, ``plan_table``, ``timeout_ms``, ``fallback``, ``precision``,
``priority``, ``deadline_ms`` and ``codec`` override the config file only
when given; ``model:=python:rrto_ros.zoo:keypoint_net
plan_table:=config/plans/keypoint_net_224.json`` runs the shipped hybrid plans.
With a local server, ``server`` is also the endpoint that server binds, and
``fallback`` defaults to ``skip``: that server shares this machine's cores, so
computing a frame on the robot while it works would only slow both (frames
it cannot serve yet publish a ``skipped`` record and no outputs).

A server that requires CURVE (``docs/security.md``): ``server_key:=`` (its
public ``.key``) and ``client_key:=`` (this robot's ``.key_secret``) go to
``offload_node`` and ``bandwidth_monitor``; ``server_keys:=`` (a key
directory from ``rrto-keys``) to the local ``server_node``.  Paths only: key
material is never passed on a command line nor logged.
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
             'fallback': str, 'precision': str, 'priority': int, 'deadline_ms': float,
             'codec': str, 'server_key': str, 'client_key': str}
# bandwidth_monitor parameters a launch argument may override (it probes the same server)
LINK_OVERRIDES = ('server', 'server_key', 'client_key')


def _given(context, name: str) -> str:
    return LaunchConfiguration(name).perform(context)


def _nodes(context):
    config = _given(context, 'config')
    server = _given(context, 'server')
    activate = _given(context, 'activate') == 'true'
    local_server = _given(context, 'start_local_server') == 'true'
    offload = {name: kind(_given(context, name)) for name, kind in
               dict(OVERRIDES, server=str).items() if _given(context, name)}
    if local_server:
        offload.setdefault('fallback', 'skip')   # robot and server share these cores
    link = {name: offload[name] for name in LINK_OVERRIDES if name in offload}
    server_params = dict({'bind': server} if server else {},
                         **({'keys': _given(context, 'server_keys')}
                            if _given(context, 'server_keys') else {}))
    return [
        *managed_node('server_node', [_given(context, 'server_config')] +
                      ([server_params] if server_params else []), activate,
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
        'timeout_ms': "slower calls fall back, e.g. 500.0; 0 = auto ('' = from config)",
        'fallback': "local | skip: frames the server cannot serve ('' = skip with the local "
                    'server, else from config)',
        'server_key': "the server's public CURVE .key file ('' = from config)",
        'client_key': "this robot's CURVE .key_secret file ('' = from config)",
        'server_keys': "the local server's CURVE key directory from rrto-keys ('' = from "
                       'server_config)',
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
