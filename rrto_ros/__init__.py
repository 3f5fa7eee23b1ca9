"""
rrto_ros: run a robot's DNN inference on a GPU server as if it ran locally.

>>> from rrto_ros import offload
>>> model = offload(my_module, server='tcp://gpu-server:5555', timeout_ms=50)
>>> outputs = model(frame)           # same outputs as my_module(frame)
>>> model.stats()['round_trips']     # one per call once recorded

The names below are imported on first use: a process that imports only a
submodule (a ROS node that never runs a model, ``camera_sim``) does not pay
for the engine's imports (torch's export machinery takes seconds of CPU).
"""

import importlib

_HOMES = {'offload': 'rrto_ros.engine', 'OffloadedModel': 'rrto_ros.engine',
          'OffloadResult': 'rrto_ros.records', 'CallRecord': 'rrto_ros.records',
          'OffloadError': 'rrto_ros.client', 'RemoteError': 'rrto_ros.client',
          'ServerUnavailable': 'rrto_ros.client'}

__all__ = ['offload', 'OffloadedModel', 'OffloadResult', 'CallRecord', 'OffloadError',
           'RemoteError', 'ServerUnavailable']


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
