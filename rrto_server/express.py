"""
The express path: the common inference served start to finish with the least Python.

The common request is a raw (no codec) INFER of an already recorded,
single-segment replay, sent while the device is idle or busy only with less
urgent work (preemptive policy).  For it the I/O thread does only this: check
every frame against the recorded signature (:meth:`ExpressPlan.accept`: the
same dtype and shape, no codec, exactly the declared bytes), run the replay on
the frames' bytes (:meth:`ExpressPlan.run`: on a CUDA server one memcpy into
the page-locked staging buffers, one CUDA-graph replay that copies its inputs
in and its outputs out to page-locked buffers; the lane then waits for its
stream) and send the reply from those buffers with its descriptors computed
once per replay
(:attr:`ExpressPlan.body`).  No tensor is decoded, no execution object is
built, no copy stream is involved.  :class:`~rrto_server.express_job.ExpressJob` is
the request as a scheduler job, served by :meth:`~rrto_server.express_job.ExpressJob.serve`
only while no job is queued and no lane is busy (it takes lane 0 with
:meth:`~rrto_server.inline_runs.InlineRuns.take_idle`, runs the replay, builds
the reply while the device runs it, waits for the lane's stream and sends, in
one call), or, under preemption, when it is more urgent than every job queued
or running (:meth:`~rrto_server.inline_runs.InlineRuns.run_inline`: it then
waits, at most ``INLINE_WAIT_S`` of :mod:`rrto_server.server`, for the lanes'
current segments to end, and runs at that boundary without the hand-off to a
lane thread and back), so nothing more urgent ever waits behind it.

Anything unusual takes the general path (:class:`~rrto_server.jobs.InferJob`),
which answers it exactly as before: a codec, another signature, a frame of
the wrong size (the general path then names the error), a multi-segment
replay (its segment boundaries are preemption points), a busy device (work as
urgent, or a lane step longer than ``INLINE_WAIT_S``), or a
CUDA replay whose express output buffers are still being sent by libzmq.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import zmq

from rrto_wire import protocol as wire
from rrto_wire.codecs import RAW
from rrto_wire.tensors import Signature


class ExpressPlan:
    """What one replay's express requests share: the expected frames and the reply's body."""

    def __init__(self, signature: Signature, runner: Any):
        self.signature = signature
        self.runner = runner
        self._expect = [(spec.dtype, spec.shape, spec.nbytes) for spec in signature]
        self.nbytes = sum(spec.nbytes for spec in signature)    # of the inputs
        # a CUDA graph answers from the same page-locked buffers every time: describe and
        # frame them once; a CPU runner's outputs are new tensors each time
        fixed = runner.express_outputs
        self.body = None if fixed is None else wire.raw_body(fixed)
        self.body_nbytes = 0 if fixed is None else _nbytes(self.body[1])
        self._tracker: zmq.MessageTracker | None = None    # the last reply sent from them

    def accept(self, descriptors: Sequence[Any], frames: Sequence[Any]) -> list | None:
        """
        Return the frames' buffers if the request can take the express path, else None.

        It can when every frame is raw and exactly of the recorded dtype, shape
        and size, and the reply buffers are free (libzmq released the last reply
        sent from them).
        """
        if len(descriptors) != len(self._expect) or len(frames) != len(self._expect):
            return None
        if self._tracker is not None and not self._tracker.done:
            return None
        buffers = []
        for desc, frame, (dtype, shape, nbytes) in zip(descriptors, frames, self._expect):
            if desc.codec != RAW or desc.dtype != dtype or desc.shape != shape:
                return None
            buffer = frame.buffer
            if len(buffer) != nbytes:
                return None
            buffers.append(buffer)
        return buffers

    def run(self, buffers: list) -> list[torch.Tensor]:
        """
        Run the replay on accepted buffers; return its outputs on the CPU.

        On a CUDA runner they are complete once the current stream is
        synchronised, which the lane running the step does (``Lane.run``).
        """
        return self.runner.express(buffers, self.signature)

    def reply_body(self, outputs: list[torch.Tensor]) -> tuple[list[dict], list]:
        """Return the reply's descriptors and zero-copy frames for :meth:`run`'s outputs."""
        return self.body if self.body is not None else wire.raw_body(outputs)

    def reply(self, outputs: list[torch.Tensor]) -> tuple[tuple[list[dict], list], int]:
        """Return :meth:`reply_body` and the size of its frames, in bytes."""
        if self.body is not None:
            return self.body, self.body_nbytes
        body = wire.raw_body(outputs)
        return body, _nbytes(body[1])

    def sent(self, tracker: zmq.MessageTracker | None) -> None:
        """Note the reply's tracker: the fixed output buffers are reused once it is done."""
        if self.body is not None:
            self._tracker = tracker


def _nbytes(frames: list) -> int:
    total = 0
    for frame in frames:        # zero-copy buffers: each has the buffer protocol
        total += memoryview(frame).nbytes
    return total
