"""The id of a replay: model digest, input signature and record options."""

from __future__ import annotations

import torch

from rrto_server import segments as segmentation
from rrto_wire.messages import RecordOptions
from rrto_wire.tensors import Signature, signature_key

# precision -> autocast dtype; 'fp32' is strict fp32 (TF32 off), 'tf32' lets CUDA use TF32
PRECISIONS = {'fp32': None, 'tf32': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}


def replay_key(digest: str, signature: Signature, options: RecordOptions) -> str:
    """Return the id a client uses to run a replay."""
    return f'{digest}|{signature_key(signature)}|{options.key}'


def check_options(options: RecordOptions) -> None:
    """Raise ProtocolError if the (schema-valid) options name an unknown segmentation."""
    segmentation.parse_granularity(options.segments)
