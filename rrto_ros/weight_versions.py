"""
Whether a module still holds the weights and buffers the server was given.

The server runs a copy of a module's tensors taken when the model was
prepared (exported and uploaded under the digest of its bytes).
``load_state_dict`` copies a checkpoint into the very same tensor objects, a
running statistic or an optimiser writes into them in place,
``load_state_dict(assign=True)`` puts new tensors in their place: none of this
reaches the server, which would go on computing the old model.

A :class:`Snapshot` notes, when the model is prepared, where the module holds
each parameter and buffer (the entry of its module's dict, and every
submodule where its parent holds it) and each tensor's version counter
(``t._version``: every write through torch's dispatcher bumps it, in
``inference_mode`` too, and a ``detach()``-ed alias shares it).
:meth:`Snapshot.changed` compares them again: two tuples of integers and a
walk of identities (ResNet-18, 122 tensors: ~15 us a call).  A tensor made in
inference mode has no version counter (and cannot be written outside
``inference_mode``): only where it is held is checked, and a warning says so
(comparing its bytes instead cost 40 ms a call for a ResNet-18 built in
inference mode; build the model outside ``inference_mode``).  New memory
put behind a tensor (``p.data = other``, as ``module.half()`` does) is seen by
its address.  Writes that bypass the dispatcher or the version counter
(``p.data.copy_(...)``: ``.data`` is an alias without the counter;
``t.numpy()`` then numpy, ``np.from_dlpack``, ``ctypes``) change no version and
are not seen (README, docs/security.md).
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch

log = logging.getLogger('rrto_ros.weight_versions')
_VERSION = operator.attrgetter('_version')
_DATA_PTR = torch.Tensor.data_ptr     # unbound: half the cost of a methodcaller


class Snapshot:
    """The tensors a module holds, where it holds them, and their versions (module doc)."""

    def __init__(self, module: torch.nn.Module, ignore: frozenset = frozenset()):
        self.places: list[tuple[dict, str]] = []     # (holding dict, key)
        self.held: list[Any] = []                    # what each place held
        self.names: list[str] = []
        self.tracked: list[torch.Tensor] = []
        self.tracked_names: list[str] = []
        self.unchecked: list[str] = []      # inference tensors: no version counter
        seen: set[int] = set()
        script = isinstance(module, torch.jit.ScriptModule)
        for prefix, sub in module.named_modules():
            holders = () if script else (sub._modules, sub._parameters, sub._buffers)
            for holder in holders:
                for key, value in holder.items():
                    self.places.append((holder, key))
                    self.held.append(value)
                    self.names.append(f'{prefix}.{key}' if prefix else key)
            tensors = [(n, t, True) for n, t in sub.named_parameters(recurse=False)]
            tensors += [(n, t, True) for n, t in sub.named_buffers(recurse=False)]
            tensors += [(n, t, False) for n, t in vars(sub).items()     # plain attributes
                        if isinstance(t, torch.Tensor)]
            for name, t, state in tensors:
                if t is None or id(t) in seen or id(t) in ignore:
                    continue
                seen.add(id(t))
                full = f'{prefix}.{name}' if prefix else name
                if t.is_inference():    # no version counter: where it is held, only
                    self.unchecked += [full] if state else []
                else:
                    self.tracked.append(t)
                    self.tracked_names.append(full)
        if self.unchecked:
            log.warning('%d tensors of %s (%s, ...) were made in inference mode: no version '
                        'counter; a write into them inside inference_mode is not seen (build '
                        'the model outside inference_mode)',
                        len(self.unchecked), type(module).__name__, self.unchecked[0])
        self.holders = [h for h, _ in self.places]
        self.keys = [k for _, k in self.places]
        self.versions = self._versions()
        self.pointers = self._pointers()

    def _pointers(self) -> tuple:
        # `t.data = other` (older code, `module.half()`) puts new memory behind the same
        # tensor object and moves no version counter: its address does move
        return tuple(map(_DATA_PTR, self.tracked))

    def _versions(self) -> tuple:
        return tuple(map(_VERSION, self.tracked))

    def changed(self) -> str:
        """Return what changed since the snapshot ('' if nothing did)."""
        if not all(map(operator.is_, map(dict.get, self.holders, self.keys), self.held)):
            name = next(n for (h, k), v, n in zip(self.places, self.held, self.names)
                        if h.get(k) is not v)
            return f'{name} was replaced'
        if self._versions() != self.versions:
            name = next(n for t, v, n in zip(self.tracked, self.versions, self.tracked_names)
                        if t._version != v)
            return f'{name} was written in place'
        if self._pointers() != self.pointers:
            name = next(n for t, a, n in zip(self.tracked, self.pointers, self.tracked_names)
                        if t.data_ptr() != a)
            return f'{name} was given other memory (.data)'
        return ''

    def written(self) -> frozenset:
        """Return the ids of the tensors written since the snapshot (a forward's own state)."""
        return frozenset(id(t) for t, v in zip(self.tracked, self.versions) if t._version != v)


def versions(tensors: Any) -> tuple:
    """Return the version counters of tensors (-1 for an inference tensor: it has none)."""
    return tuple(-1 if t.is_inference() else t._version for t in tensors)


def snapshot(local: Any, ignore: frozenset = frozenset()) -> Snapshot | None:
    """
    Return a snapshot of a local model's module (None for a model without one: ONNX).

    ``ignore``: ids of tensors the model's own forward writes (its running
    state, which stays the robot's: a graph that writes it runs on the robot).
    """
    module = getattr(local, 'module', None)
    return Snapshot(module, ignore) if isinstance(module, torch.nn.Module) else None


def reason(what: str) -> str:
    """Return a call record's reason for a change :meth:`Snapshot.changed` found."""
    return (f'the model\'s weights changed since the server was given them ({what}); '
            'it runs locally until prepared again')
