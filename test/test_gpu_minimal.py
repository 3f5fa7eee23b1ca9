"""The minimal-server floor of bench.gpu_floor answers right (skipped without CUDA)."""

import pytest
import torch

from bench import gpu_floor, gpu_models
from bench.gpu_minimal import Minimal
from rrto_server.process import ServerProcess

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]


def test_minimal_server_answers_the_local_outputs():
    model, frame = gpu_models.build('resnet18')
    with torch.inference_mode():
        local = [model(frame)]
    minimal = Minimal('resnet18', 'cuda')
    try:
        for _ in range(3):      # the reply buffers are reused: every reply is the whole answer
            wall, server, replies = minimal.round_trip(frame)
            outputs = [torch.frombuffer(bytearray(r.buffer), dtype=x.dtype).reshape(x.shape)
                       for r, x in zip(replies, local)]
            assert len(replies) == len(local)
            assert gpu_floor.rel_error(outputs, local) < 1e-4
            assert 0 < server < wall
    finally:
        minimal.close()


def test_floor_rows_carry_the_minimal_server(tmp_path):
    echo = gpu_floor.Echo()
    server = ServerProcess(str(tmp_path), None, device='cuda').start()
    try:
        row = gpu_floor.measure('resnet18', server.endpoint, echo, torch.device('cuda'), 5,
                                None, None)
    finally:
        server.stop()
        echo.close()
    assert row['minimal_rel_error'] < 1e-4
    assert row['minimal_server_ms'] > 0
    assert row['server_beyond_minimal_ms'] == pytest.approx(
        row['server_ms'] - row['minimal_server_ms'])
