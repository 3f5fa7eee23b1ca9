"""
Per-call choice of the input codec for one link (``codec='auto'`` in the engine).

The rule: send each call with the candidate codec that minimises

    encode_ms + decode_ms + encoded_bytes * 8 / bandwidth

where the encode and decode times and the encoded size are measured on this
model's own inputs (every candidate is tried on the first call of a
signature and again every ``probe_every`` calls, robot-side decode time
standing in for the server's) and ``bandwidth`` is the link estimate.  The
estimate is the one the caller sets (``set_bandwidth``, e.g. from the
bandwidth monitor) or, until one is set, the goodput of this model's own
offloaded calls (bytes on the wire / network time: a lower bound, so the
rule errs towards compressing).  With no estimate at all the smallest
encoding wins.

``auto`` chooses among the lossless codecs (raw, lz4, zstd): offloaded
outputs stay equal to local ones.  ``auto_lossy`` adds JPEG, which changes
the outputs slightly (the benchmark reports by how much).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from rrto_wire import codecs
from rrto_wire.tensors import TensorSpec, signature_key, signature_of

AUTO = 'auto'
AUTO_LOSSY = 'auto_lossy'
CANDIDATES = {AUTO: codecs.LOSSLESS, AUTO_LOSSY: codecs.LOSSLESS + (codecs.JPEG,)}
PROBE_EVERY = 200
EMA_WEIGHT = 0.3


def check_codec(codec: str) -> str:
    """Return ``codec`` if the engine accepts it, else raise ValueError naming the choices."""
    if codec not in CANDIDATES:
        codecs.parse(codec)
    return codec


@dataclass
class CodecCost:
    """What one candidate costs on this model's inputs, from the last probe."""

    nbytes: int
    encode_ms: float
    decode_ms: float

    def total_ms(self, bandwidth_mbps: float | None) -> float:
        if bandwidth_mbps is None or bandwidth_mbps <= 0:
            return float(self.nbytes)  # no estimate: the smallest encoding wins
        return self.encode_ms + self.decode_ms + self.nbytes * 8 / (bandwidth_mbps * 1e3)


class CodecChooser:
    """Choose a codec per call by the rule in the module docstring."""

    def __init__(self, mode: str = AUTO, probe_every: int = PROBE_EVERY):
        if mode not in CANDIDATES:
            raise ValueError(f'codec chooser mode must be one of {list(CANDIDATES)}')
        if probe_every < 1:
            raise ValueError('probe_every must be at least 1')
        self.candidates = CANDIDATES[mode]
        self.probe_every = probe_every
        self.costs: dict[str, dict[str, CodecCost]] = {}   # signature -> codec -> cost
        self._calls: dict[str, int] = {}
        self.set_mbps: float | None = None
        self.observed_mbps: float | None = None

    @property
    def bandwidth_mbps(self) -> float | None:
        """Return the estimate in use: the one set by the caller, else the observed goodput."""
        return self.set_mbps if self.set_mbps is not None else self.observed_mbps

    def set_bandwidth(self, mbps: float | None) -> None:
        """Use ``mbps`` as the link estimate (None: fall back to observed goodput)."""
        if mbps is not None and not mbps > 0:
            raise ValueError('bandwidth must be positive (or None)')
        self.set_mbps = None if mbps is None else float(mbps)

    def observe(self, bytes_on_wire: int, network_ms: float) -> None:
        """Fold one offloaded call's bytes and network time into the goodput estimate."""
        if bytes_on_wire <= 0 or network_ms <= 0:
            return
        sample = bytes_on_wire * 8 / (network_ms * 1e3)
        if self.observed_mbps is None:
            self.observed_mbps = sample
        else:
            self.observed_mbps += EMA_WEIGHT * (sample - self.observed_mbps)

    def choose(self, tensors: Sequence[torch.Tensor]) -> str:
        """Return the codec for a call with these inputs (probing the candidates when due)."""
        key = signature_key(signature_of(tensors))
        calls = self._calls.get(key, 0)
        self._calls[key] = calls + 1
        if key not in self.costs or calls % self.probe_every == 0:
            self.costs[key] = {codec: probe(codec, tensors) for codec in self.candidates}
        bandwidth = self.bandwidth_mbps
        costs = self.costs[key]
        return min(self.candidates, key=lambda codec: costs[codec].total_ms(bandwidth))


def probe(codec: str, tensors: Sequence[torch.Tensor]) -> CodecCost:
    """Encode and decode ``tensors`` once with ``codec``; return size and times."""
    nbytes, encode_s, decode_s = 0, 0.0, 0.0
    for index, tensor in enumerate(tensors):
        start = time.perf_counter()
        used, frame = codecs.encode(codec, tensor)
        encoded = time.perf_counter()
        if frame is None:
            nbytes += tensor.numel() * tensor.element_size()
        else:
            nbytes += len(frame)
            codecs.decode(used, memoryview(frame), TensorSpec.of(tensor), index)
        decode_s += time.perf_counter() - encoded
        encode_s += encoded - start
    return CodecCost(nbytes, encode_s * 1e3, decode_s * 1e3)
