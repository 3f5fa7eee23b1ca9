"""
A ``profile`` request as a scheduler job: per-operator times of a stored program.

The robot's planner asks for them.  Each call of the program is one step at
the request's priority, charged to the key's
:class:`~rrto_server.profiling.DeviceBudget` for profiles.
"""

from __future__ import annotations

import math
import time

from rrto_server import profiling
from rrto_server.jobs import Services, job_keys
from rrto_server.lanes import EXCLUSIVE, RUN, Job
from rrto_server.requests import Request
from rrto_wire.errors import ErrorCode, ProtocolError, clip
from rrto_wire.op_timing import OperatorTimer


class ProfileJob(Job):
    """
    Time every operator of a stored program on the server's device (for the planner).

    The model comes loaded (and vetted) from the control thread, so no trial runs on
    a lane.  Each call, warm-up or timed, is one step at the request's priority and
    deadline: more urgent work runs between two of them, and after its first step the
    job also lets every later job of its priority go first (it is background work):
    its deadline then no longer orders it either (a11 #5: ``deadline_ms=0.001`` with
    ``late='run'`` kept the earliest deadline of its band to the end), so the header's
    deadline and late policy apply to its start only.  Every step is charged to the
    key's profile :class:`~rrto_server.profiling.DeviceBudget` and refused
    ``overloaded`` once that is spent.
    """

    WARMUP = 2
    BEHIND = 1 << 62          # its arrival order once it has started: after any other job

    def __init__(self, services: Services, request: Request, model,
                 budget: profiling.DeviceBudget, client: str | None):
        keys = job_keys(request.header, request.received)
        keys.update(task=keys['task'] or '(profile)')
        super().__init__(**keys, utilisation=EXCLUSIVE)
        self.services, self.request, self.model = services, request, model
        self.budget, self.client = budget, client
        self.repeats = request.header.repeats
        self.timer: OperatorTimer | None = None

    @property
    def total_steps(self) -> int:
        return self.WARMUP + self.repeats

    def step(self) -> bool:
        self.budget.check(self.client)
        start = time.perf_counter()
        try:
            if self.timer is None:
                program, device = self.model.program, self.services.device
                self.timer = OperatorTimer(program.module(self.model.weights(device), device),
                                           profiling.example_tensors(program.signature),
                                           device)
            if self.steps_done < self.WARMUP:
                self.timer.warm()
            else:
                self.timer.time()
        except ProtocolError:
            raise
        except Exception as exc:    # the program fails on the example inputs, as locally
            raise ProtocolError(ErrorCode.EXEC_FAILED,
                                f'the model failed on example inputs: {type(exc).__name__}: '
                                f'{clip(exc)}') from None
        finally:
            self.budget.charge(self.client, time.perf_counter() - start)
        self.seq, self.deadline, self.late = self.BEHIND, math.inf, RUN
        return self.steps_done + 1 >= self.total_steps

    def release(self) -> None:
        self.timer = None

    def complete(self) -> None:
        self.request.ok(profile=self.timer.medians(), device=str(self.services.device))
        self.timer = None

    def fail(self, error: ProtocolError) -> None:
        self.request.error(error)
