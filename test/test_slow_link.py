"""Offloading through the link emulator: slow links must not lose replies."""

import torch

from bench.link_config import PRESETS, Direction, LinkConfig
from bench.link_proxy import LinkEmulator
from rrto_ros import OffloadResult


class BigOutput(torch.nn.Module):
    """A model whose single output tensor (196 KB) is far larger than its input."""

    def forward(self, x):
        return x.repeat(1, 64, 1, 1) * 2.0


def test_reply_slower_than_the_heartbeat_timeout_arrives(server, offloaded):
    host, port = server.endpoint.rsplit('//', 1)[1].split(':')
    with LinkEmulator((host, int(port))) as emu:
        om = offloaded(BigOutput(), f'tcp://127.0.0.1:{emu.port}', timeout_ms=1000)
        x = torch.randn(1, 1, 28, 28)
        assert om.warmup(x)
        om(x)
        assert om.last.result == OffloadResult.OFFLOADED
        om.set_timeout(15000)   # raised on a connected socket: its heartbeat must follow
        # 196 KB at 0.6 Mbit/s: one output frame takes 2.6 s, longer than ZeroMQ's 2 s heartbeat
        emu.set_link(LinkConfig('slow_down', down=Direction(rate={'mbps': 0.6})))
        out = om(x)
        assert om.last.result == OffloadResult.OFFLOADED, om.last.reason
        assert 2.4 < om.last.total_ms / 1e3 < 6
        torch.testing.assert_close(out, BigOutput()(x))
        emu.set_link(PRESETS['unlimited'])
        om(x)
        assert om.last.result == OffloadResult.OFFLOADED
