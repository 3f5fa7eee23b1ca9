"""
The interface every replay backend implements, and one inference stepping through it.

A runner holds a model prepared for one input signature.  An
:class:`Execution` is one inference: :meth:`Runner.begin` stages its inputs
(from a CPU worker), :meth:`Runner.run_segment` runs one segment (on a device
lane), :meth:`Runner.collect` names the outputs once the last segment ran,
:meth:`Runner.to_host` copies them back (from a CPU worker again, unless the
lane already did) and :meth:`Runner.release` drops an abandoned execution's
state.  :meth:`Runner.express` serves a whole request on its raw bytes
instead (the express path, :mod:`rrto_server.express`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Sequence

import torch

if TYPE_CHECKING:
    from rrto_server.host_buffers import BufferSet


class Runner(Protocol):
    """A replay backend (fx/eager, frozen TorchScript, CUDA graphs, onnxruntime)."""

    backend: str
    num_segments: int
    can_express: bool       # :meth:`express` may serve requests (see rrto_server.express)
    fixed_cost: bool        # every input of its signature costs the same (Server._inline_ok)
    express_outputs: list[torch.Tensor] | None   # where :meth:`express` always answers, if fixed

    def begin(self, ex: 'Execution', inputs: Sequence[torch.Tensor]) -> None:
        """Stage ``inputs`` for ``ex`` (CPU worker)."""

    def run_segment(self, ex: 'Execution', k: int) -> None:
        """Run segment ``k`` of ``ex`` (device lane)."""

    def collect(self, ex: 'Execution') -> list[torch.Tensor]:
        """Return the outputs of ``ex`` after its last segment (still on the device)."""

    def to_host(self, ex: 'Execution') -> list[torch.Tensor]:
        """Return the outputs of ``ex`` on the CPU in the program's dtypes (CPU worker)."""

    def release(self, ex: 'Execution') -> None:
        """Drop the device state of an abandoned or failed ``ex``."""

    def express(self, buffers: Sequence, signature: Sequence) -> list[torch.Tensor]:
        """Run a whole inference on raw input bytes checked against ``signature``; CPU outputs."""


class Execution:
    """One inference in progress: which segment runs next and the values it needs."""

    def __init__(self, runner: Runner, inputs: Sequence[torch.Tensor]):
        self.runner = runner
        self.next_segment = 0
        self.env: dict[str, Any] = {}
        self.saved: dict[str, torch.Tensor] | None = None
        self.saves = 0      # times its live values left shared buffers for another execution
        self.outputs: list[torch.Tensor] | None = None
        self.buffers: BufferSet | None = None     # page-locked outputs, held until sent
        self.copied: Any = None                    # CUDA event: outputs are in the buffers
        # copy every output back in the last step, whatever its size (set for a step that
        # runs on the I/O thread: nobody waits for that lane, and it saves a synchronisation)
        self.copy_on_lane = False
        runner.begin(self, inputs)

    @property
    def done(self) -> bool:
        return self.outputs is not None

    @property
    def on_host(self) -> bool:
        """Return True when the last step already copied the outputs into :attr:`buffers`."""
        return self.buffers is not None and self.outputs is self.buffers.tensors

    @property
    def num_segments(self) -> int:
        return self.runner.num_segments

    def step(self) -> bool:
        """Run the next segment; return True once the outputs are ready (on the device)."""
        if self.done:
            return True
        runner = self.runner
        runner.run_segment(self, self.next_segment)
        self.next_segment += 1
        if self.next_segment == runner.num_segments:
            self.outputs = runner.collect(self)
        return self.done

    def host_outputs(self) -> list[torch.Tensor]:
        """
        Return the outputs on the CPU in the program's dtypes (call from a CPU worker).

        They may live in this execution's page-locked :attr:`buffers`: send them,
        then :meth:`release_buffers` (with the send's tracker, if any).
        """
        if self.outputs is None:
            raise RuntimeError('execution has not finished')
        host = self.runner.to_host(self)
        self.env = {}
        return host

    def release_buffers(self, tracker=None) -> None:
        """Hand the page-locked outputs back; reused once ``tracker`` (if any) is done."""
        buffers, self.buffers = self.buffers, None
        if buffers is not None:
            buffers.release(() if tracker is None else (tracker,))

    def release(self) -> None:
        """Drop this execution's device state (it is abandoned or has failed)."""
        self.runner.release(self)
        self.release_buffers()

    def run(self) -> list[torch.Tensor]:
        """Run every remaining segment now; return the outputs on the CPU, owned by the caller."""
        while not self.step():
            pass
        host = self.host_outputs()
        if self.buffers is not None:
            host = [t.clone() for t in host]
            self.release_buffers()
        return host
