"""
``offload_node``'s parameters: declarations with their checks, and the helpers that read them.

Every parameter is declared once here with its default, description and check
(:mod:`rrto_ros.nodes.params`); ``config/offload.yaml`` holds the same defaults.
"""

from __future__ import annotations

import os

from rrto_ros.codec_choice import check_codec
from rrto_ros.engine import AUTO_TIMEOUT, FALLBACKS, MODES
from rrto_ros.export_cache import DEFAULT_DIR as DEFAULT_EXPORT_CACHE
from rrto_ros.image import CHANNEL_ORDERS
from rrto_ros.nodes.params import check_endpoint, KEY_PARAMS, Param
from rrto_ros.plan_table import PlanTable
from rrto_ros.preprocess import IMAGENET_MEAN, IMAGENET_STD
from rrto_wire import strategy as strategy_file


PARAMS = [
    Param('server', 'tcp://127.0.0.1:5555', 'rrto_server endpoint', check=check_endpoint),
    Param('directory', '', "fleet directory endpoint ('' = the one server at 'server')",
          check=lambda v: check_endpoint(v) if v else None),
    Param('model', 'python:rrto_ros.zoo:resnet18',
          "python:package.module:factory, or a .pt2 / TorchScript / .onnx file"),
    Param('input_topic', '/camera/image_raw', 'sensor_msgs/Image topic to run the model on'),
    Param('output_prefix', '~/output', 'outputs go to <output_prefix>/<output name>'),
    Param('mode', 'replay', 'replay | eager | naive | local', choices=MODES),
    Param('precision', 'fp32', 'server-side precision', choices=('fp32', 'fp16', 'bf16')),
    Param('timeout_ms', 0.0, "a call slower than this falls back (see 'fallback'); 0 = auto: "
          "3x the server's recent inference time (measured when it recorded, then from its "
          'replies; doubled by a late reply), within 200..4000 ms (changeable at run time)',
          runtime=True, range=(0.0, 60000.0)),
    Param('fallback', 'local', "a frame the server cannot serve (preparing, unreachable, late, "
          "error): 'local' runs it on the robot, 'skip' publishes no outputs for it and "
          'computes nothing (for a server that shares the robot\'s CPU)', choices=FALLBACKS),
    Param('connect_timeout_ms', 1000.0, 'connection timeout', range=(1.0, 60000.0)),
    *KEY_PARAMS,
    Param('task', '', "task name the server schedules by ('' = the model's name)"),
    Param('priority', 0, 'server scheduling priority (higher first)', range=(-100, 100)),
    Param('deadline_ms', 0.0, 'server deadline per inference (0 = none)', range=(0.0, 60000.0)),
    Param('codec', 'raw', 'input codec: raw, lz4, zstd, jpeg, jpeg:Q (lossy), auto or '
          'auto_lossy (chosen per call by the link estimate)', check=lambda v: codec_problem(v)),
    Param('late', 'server', "past its deadline: 'drop' (run locally), 'run' late, or 'server' "
          "(the server's --late-policy)", choices=('server', 'drop', 'run')),
    Param('resize_height', 224, 'resize frames on the robot to this height (0 = keep)',
          range=(0, 8192)),
    Param('resize_width', 224, 'resize frames on the robot to this width (0 = keep)',
          range=(0, 8192)),
    Param('channel_order', 'rgb', 'channel order the network expects', choices=CHANNEL_ORDERS),
    Param('normalize', True, 'divide by input_scale and normalise with mean/std on the server'),
    Param('mean', list(IMAGENET_MEAN), 'per-channel mean (after dividing by input_scale)'),
    Param('std', list(IMAGENET_STD), 'per-channel std (after dividing by input_scale)',
          check=lambda v: None if all(s > 0 for s in v) else 'every std must be > 0'),
    Param('input_scale', 255.0, 'pixel value that maps to 1.0 (255 for 8-bit images)',
          range=(1e-9, 1e9)),
    Param('plan_table', '', "hybrid plan table from rrto-plan ('' = whole-model offload); a "
          'relative path is looked up in the working directory, then in the package share '
          '(changeable at run time)', runtime=True, check=lambda v: table_problem(v)),
    Param('strategy', '', "strategy file from rrto-plan-tasks ('' = none): its entry for "
          "'task' sets the variant (model), priority, segments and deadline_ms",
          check=lambda v: strategy_problem(v)),
    Param('switch_after', 2, 'switch plans after this many inferences agree on the new one',
          range=(1, 100)),
    Param('export_cache', DEFAULT_EXPORT_CACHE, "directory keeping the robot's exports, so a "
          "restart skips torch.export ('' = export on every start; ~ is expanded)"),
    Param('diagnostics_period_s', 1.0, 'period of /diagnostics', range=(0.1, 60.0)),
]


def resolve_table(value: str) -> str:
    """Return the plan table file a parameter value names (working directory, then share)."""
    if not value or os.path.isabs(value) or os.path.exists(value):
        return value
    try:
        from ament_index_python.packages import get_package_share_directory
        shared = os.path.join(get_package_share_directory('rrto_ros'), value)
    except (ImportError, LookupError, KeyError, ValueError):
        return value
    return shared if os.path.exists(shared) else value


def codec_problem(value: str) -> str | None:
    """Return why ``value`` is no codec the engine accepts."""
    try:
        check_codec(value)
    except ValueError as exc:
        return str(exc)
    return None


def timeout_value(value: float) -> float | str:
    """Return the engine's timeout for a ``timeout_ms`` parameter value (0: auto)."""
    return AUTO_TIMEOUT if value == 0 else value


def strategy_problem(value: str) -> str | None:
    """Return why ``value`` names no readable strategy file ('' is fine: none)."""
    if not value:
        return None
    try:
        strategy_file.load(value)
    except ValueError as exc:
        return str(exc)
    return None


def table_problem(value: str) -> str | None:
    """Return why ``value`` names no readable plan table ('' is fine: no table)."""
    if not value:
        return None
    try:
        PlanTable.load(resolve_table(value))
    except ValueError as exc:
        return str(exc)
    return None
