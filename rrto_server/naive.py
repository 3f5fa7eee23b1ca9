"""
Naive per-operator remote execution: the baseline record/replay improves on.

This is how transparent CUDA API remoting (Cricket and similar) behaves: each
operator is one request and one reply, and intermediate tensors stay on the
server as device memory does under remoting.  A client session holds named
remote tensors; an ``op`` request runs one allowlisted operator on them (or on
the model's parameters) and stores the result under a new name.

A session works on its own copies of the parameters it names, never on the
stored weights that replays of the same model (maybe another client's) use:
an in-place operator in one session cannot change anyone else's results.
The server offers this mode only when started with it enabled.

Sessions are bounded: at most ``MAX_SESSIONS`` of them, ``session_bytes`` of
tensors each and ``TOTAL_SESSIONS`` times that in all; an operator's result
size is worked out on the ``meta`` device before it runs, so one that would
not fit is refused (``too_large``) without allocating it.
"""

from __future__ import annotations

import threading
import time

import torch

from rrto_wire import ops
from rrto_server.models import ModelRegistry
from rrto_server.sandbox import no_trial
from rrto_wire.program import decode_arg
from rrto_wire import messages
from rrto_wire.errors import ErrorCode, ProtocolError

MAX_SESSION_VALUES = 100_000
MAX_SESSIONS = 256
TOTAL_SESSIONS = 4              # all sessions together hold at most this many sessions' bytes


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(item) for item in value)
    return 0


def _meta(value):
    if isinstance(value, torch.Tensor):
        return value.to('meta')
    if isinstance(value, (tuple, list)):
        return type(value)(_meta(item) for item in value)
    return torch.device('meta') if isinstance(value, torch.device) else value


class NaiveSessions:
    """Per-client tables of remote tensors, expired after ``ttl_s`` idle seconds."""

    def __init__(self, registry: ModelRegistry, device: torch.device, ttl_s: float = 60.0,
                 session_bytes: int = 1 << 30):
        self.registry = registry
        self.session_bytes = session_bytes
        self.device = device
        self.ttl_s = ttl_s
        self._sessions: dict[str, tuple[float, dict]] = {}
        self._lock = threading.Lock()
        self.ops_run = 0

    def _values(self, session: str) -> dict:
        now = time.monotonic()
        with self._lock:
            for key in [k for k, (seen, _) in self._sessions.items() if now - seen > self.ttl_s]:
                del self._sessions[key]
            if session not in self._sessions and len(self._sessions) >= MAX_SESSIONS:
                raise ProtocolError(ErrorCode.OVERLOADED,
                                    f'{MAX_SESSIONS} naive sessions open; end one first')
            _, values = self._sessions.get(session, (now, {}))
            self._sessions[session] = (now, values)
            return values

    def _admit(self, values: dict, nbytes: int) -> None:
        """Refuse ``nbytes`` more in the session holding ``values`` if a cap would pass."""
        with self._lock:
            total = sum(_nbytes(v) for _, held in self._sessions.values() for v in held.values())
        held = sum(_nbytes(v) for v in values.values())
        if held + nbytes > self.session_bytes or total + nbytes > \
                TOTAL_SESSIONS * self.session_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE,
                                f'a result of {nbytes} bytes does not fit this session '
                                f'({held} held, at most {self.session_bytes})')

    def release(self, session: str) -> None:
        with self._lock:
            self._sessions.pop(session, None)

    def __len__(self) -> int:
        return len(self._sessions)

    def run(self, session: str, header: messages.Op,
            tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run one operator request; return the fetched tensors (on the CPU)."""
        values = self._values(session)
        names = header.inputs
        if len(names) != len(tensors):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'inputs' must name each attached tensor")
        self._admit(values, _nbytes(tensors))
        for name, tensor in zip(names, tensors):
            values[name] = tensor.to(self.device)
        model = self.registry.get(header.model, no_trial)     # vetted before (a14 #5)
        if model.program is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, 'naive mode needs an rrto-program model')
        params, weights = model.program.params, model.weights(self.device)

        def lookup(name: str):
            if name in values:
                return values[name]
            if name in params:              # the session's copy, made on first use
                if ('param', name) not in values:
                    self._admit(values, _nbytes(weights[params[name]]))
                return values.setdefault(('param', name), weights[params[name]].clone())
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f'no remote value {name[:80]!r} in this session')

        op = header.op
        if op is not None:
            fn = ops.resolve(op)
            kwargs = {k: decode_arg(v, lookup, self.device)
                      for k, v in ops.check_call(fn, header.args, header.kwargs).items()}
            args = decode_arg(header.args, lookup, self.device)
            if ops.creates_tensors(fn) and kwargs.get('device') is None:
                kwargs['device'] = self.device
            try:
                with torch.inference_mode():
                    meta = {key: _meta(value) for key, value in kwargs.items()}
                    try:                 # the result's size, before anything is allocated
                        size = _nbytes(fn(*_meta(args), **meta))
                    except NotImplementedError:
                        size = 0         # no meta kernel: counted once it ran
                    self._admit(values, size)
                    result = fn(*args, **kwargs)
                self._admit(values, 0 if size else _nbytes(result))
            except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                raise ProtocolError(ErrorCode.EXEC_FAILED, f'{op} failed: {exc}') from None
            if len(values) >= MAX_SESSION_VALUES:
                raise ProtocolError(ErrorCode.TOO_LARGE, 'session holds too many remote values')
            values[str(header.out)] = result
            self.ops_run += 1
        fetched = []
        for name in header.fetch:
            value = lookup(name)
            if not isinstance(value, torch.Tensor):
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST,
                    f'remote value {name!r} is not a tensor')
            fetched.append(value.to('cpu'))
        if header.end:
            self.release(session)
        return fetched
