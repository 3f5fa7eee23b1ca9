"""
rrto_ros: run a robot's DNN inference on a GPU server as if it ran locally.

>>> from rrto_ros import offload
>>> model = offload(my_module, server='tcp://gpu-server:5555', timeout_ms=50)
>>> outputs = model(frame)           # same outputs as my_module(frame)
>>> model.stats()['round_trips']     # one per call once recorded
"""

from rrto_ros.client import OffloadError, RemoteError, ServerUnavailable
from rrto_ros.engine import OffloadedModel, offload
from rrto_ros.records import CallRecord, OffloadResult

__all__ = ['offload', 'OffloadedModel', 'OffloadResult', 'CallRecord', 'OffloadError',
           'RemoteError', 'ServerUnavailable']
