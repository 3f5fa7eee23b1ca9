r"""
Userspace emulator of the robot-server link: a shaping TCP proxy on loopback.

The robot connects to the emulator instead of the server; every byte is
forwarded through two shaped directions, ``up`` (robot -> server) and
``down``.  Each direction models, independently and configurably per run:

* **bandwidth**: a token bucket filled at the direction's rate, which may vary
  over time (a constant, synthetic steps, or a measured trace replayed from
  ``bench.traces``); its depth is ``burst_ms`` of data at the current rate (at
  least two packets), so a message sent after an idle period gains at most
  that much.  A rate of zero is an outage: the stream stalls until it returns.
* **one-way delay** (``delay_ms``, half the RTT) and **jitter**: each piece of
  data arrives after ``delay_ms`` plus a uniform draw in ``+-jitter_ms``
  (netem's default distribution), never before the piece sent ahead of it on
  the same connection (TCP delivers in order).
* **loss** as stalls: TCP never loses bytes, so a lost packet shows as its
  connection stalling for a retransmission timeout (``stall_ms``, default
  Linux's minimum RTO of 200 ms).  Each 1448-byte packet is lost with
  probability ``loss``; the data behind it on that connection waits.

The link is shared: all connections through one emulator draw on the same
two buckets, as all of a robot's flows share one radio.  Departure times are
computed from the rate schedule, not from when a thread woke up, and the
forwarder reads ``READ_AHEAD_S`` ahead of the link, so scheduling lateness
does not cost link capacity.

Library::

    with LinkEmulator(upstream=('127.0.0.1', 5555), link=PRESETS['wifi_congested']) as emu:
        robot_endpoint = f'tcp://127.0.0.1:{emu.port}'
        emu.set_link(grid_link(5))          # change the link between two inferences

Command line (``--control``: JSON commands on stdin, used by the benchmarks)::

    python -m bench.linkemu --upstream 127.0.0.1:5555 --listen 127.0.0.1:6000 \
        --preset wifi_congested
    python -m bench.linkemu --upstream 127.0.0.1:5555 --rate 20 --rtt-ms 10 --jitter-ms 2
    python -m bench.linkemu --upstream 127.0.0.1:5555 --steps 100:3,5:3,50:3 --rtt-ms 4
    python -m bench.linkemu --upstream 127.0.0.1:5555 --rtt-ms 40 \
        --trace cellular_mahimahi/Verizon-LTE-short.up \\
        --down-trace cellular_mahimahi/Verizon-LTE-short.down
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import select
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from bench import traces

PACKET_BYTES = 1448          # TCP payload of one 1500-byte packet
MIN_BURST_BYTES = 2 * 1500
PIECE_BYTES = 16384          # the forwarder's scheduling quantum
READ_AHEAD_S = 0.02
RECV_BYTES = 65536


# ---------------------------------------------------------------------- configuration
def schedule_of(rate: dict) -> traces.RateSchedule:
    """Build the :class:`~bench.traces.RateSchedule` a rate spec names."""
    if not isinstance(rate, dict):
        raise ValueError(f'a rate spec is a dict, got {rate!r}')
    scale = float(rate.get('scale', 1.0))
    if 'mbps' in rate:
        schedule = traces.constant(float(rate['mbps']))
    elif 'steps' in rate:
        schedule = traces.steps([(float(m), float(s)) for m, s in rate['steps']],
                                loop=rate.get('loop', True))
    elif 'trace' in rate:
        schedule = traces.load(rate['trace'], float(rate.get('bin_ms', 10.0)))
    else:
        raise ValueError(f'rate spec {rate!r} has none of mbps, steps, trace')
    return schedule if scale == 1.0 else schedule.scaled(scale)


@dataclass(frozen=True)
class Direction:
    """One direction of the link; ``rate`` is None (unlimited) or a rate spec dict."""

    rate: dict | None = None      # {'mbps': x} | {'steps': [[mbps, s], ...]} | {'trace': path}
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    stall_ms: float = 200.0
    burst_ms: float = 1.0

    def __post_init__(self):
        if self.delay_ms < 0 or self.jitter_ms < 0 or self.stall_ms < 0 or self.burst_ms < 0:
            raise ValueError('delay, jitter, stall and burst must not be negative')
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError('loss is a probability per packet, in [0, 1]')
        if self.rate is not None:
            schedule_of(self.rate)  # fail at configuration, not inside a forwarder thread

    @property
    def mbps(self) -> float | None:
        """Return the mean rate in Mbit/s (None when unlimited)."""
        return None if self.rate is None else schedule_of(self.rate).mean_mbps


@dataclass(frozen=True)
class LinkConfig:
    """A whole link: a name and its two directions."""

    name: str = 'unlimited'
    up: Direction = field(default_factory=Direction)
    down: Direction = field(default_factory=Direction)

    @property
    def rtt_ms(self) -> float:
        return self.up.delay_ms + self.down.delay_ms

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> 'LinkConfig':
        return cls(obj.get('name', 'link'), Direction(**obj.get('up', {})),
                   Direction(**obj.get('down', {})))


def symmetric(name: str, rate: dict | None, rtt_ms: float = 0.0, jitter_ms: float = 0.0,
              loss: float = 0.0, stall_ms: float = 200.0, down_rate: dict | None = None,
              ) -> LinkConfig:
    """Return a link with the same delay, jitter and loss both ways (rates may differ)."""
    up = Direction(rate, rtt_ms / 2, jitter_ms, loss, stall_ms)
    return LinkConfig(name, up, replace(up, rate=down_rate if down_rate is not None else rate))


def grid_link(mbps: float, rtt_ms: float = 4.0) -> LinkConfig:
    """Return a clean symmetric link of ``mbps`` with ``rtt_ms`` (the bandwidth grid)."""
    return symmetric(f'grid_{mbps:g}mbps', {'mbps': mbps}, rtt_ms)


def steps_link(levels: list[tuple[float, float]], rtt_ms: float = 4.0,
               name: str = '') -> LinkConfig:
    """Return a symmetric link whose rate follows ``[(Mbit/s, seconds), ...]`` and loops."""
    name = name or 'steps_' + '_'.join(f'{m:g}' for m, _ in levels)
    return symmetric(name, {'steps': [list(level) for level in levels]}, rtt_ms)


def trace_link(name: str, up: str, rtt_ms: float, down: str | None = None,
               offset_s: float = 0.0, bin_ms: float = 10.0) -> LinkConfig:
    """Return a link replaying a measured trace (uplink; ``down`` or the same for downlink)."""
    def spec(path):
        return {'trace': path, 'offset_s': offset_s, 'bin_ms': bin_ms}
    return symmetric(name, spec(up), rtt_ms, down_rate=spec(down or up))


PRESETS = {
    'unlimited': LinkConfig(),
    'wifi6_good': symmetric('wifi6_good', {'mbps': 300}, rtt_ms=2.0, jitter_ms=0.2),
    'wifi_congested': symmetric('wifi_congested', {'mbps': 20}, rtt_ms=10.0, jitter_ms=3.0,
                                loss=2e-4),
    'outdoor_weak': symmetric('outdoor_weak', {'mbps': 5}, rtt_ms=30.0, jitter_ms=5.0,
                              loss=1e-3),
}


def mean_mbps(direction: Direction, seconds: float) -> float | None:
    """Return the mean rate over the first ``seconds`` after the link was set (None: unlimited)."""
    if direction.rate is None:
        return None
    schedule = schedule_of(direction.rate)
    offset = float(direction.rate.get('offset_s', 0.0))
    seconds = max(seconds, 1e-3)
    return (schedule.capacity(offset + seconds) - schedule.capacity(offset)) * 8 / seconds / 1e6


# ---------------------------------------------------------------------- shaping
class Shaper:
    """
    Departure times of one direction: a token bucket on a rate schedule.

    Pure computation on the times it is given (no sleeping), so it is tested
    in virtual time; thread-safe because every connection shares it.
    """

    def __init__(self, direction: Direction, start: float, seed: int = 0):
        self.direction = direction
        self.start = start
        self.offset = float((direction.rate or {}).get('offset_s', 0.0))
        self.schedule = None if direction.rate is None else schedule_of(direction.rate)
        self.rng = random.Random(seed)
        self._lock = threading.Lock()
        self.t_last = start
        self.tokens = 0.0
        self.bytes = 0
        self.losses = 0

    def _capacity(self, t: float) -> float:
        return self.schedule.capacity(t - self.start + self.offset)

    def _time_for(self, capacity: float) -> float:
        return self.schedule.time_for(capacity) - self.offset + self.start

    def burst_bytes(self, t: float) -> float:
        rate = self.schedule.rate_at(t - self.start + self.offset)
        return max(MIN_BURST_BYTES, rate * self.direction.burst_ms / 1e3)

    def depart(self, t_arrival: float, nbytes: int) -> float:
        """Return when ``nbytes`` arriving at ``t_arrival`` have passed the bottleneck."""
        with self._lock:
            self.bytes += nbytes
            if self.schedule is None:
                return t_arrival
            t = max(t_arrival, self.t_last)
            tokens = min(self.burst_bytes(t),
                         self.tokens + self._capacity(t) - self._capacity(self.t_last))
            if tokens >= nbytes:
                self.t_last, self.tokens = t, tokens - nbytes
            else:
                self.t_last = self._time_for(self._capacity(t) + nbytes - tokens)
                self.tokens = 0.0
            return self.t_last

    def busy_until(self) -> float:
        return self.t_last

    def extra_delay_s(self, nbytes: int) -> float:
        """Draw the delay after departure: one-way delay, jitter, and a stall per loss."""
        d = self.direction
        with self._lock:
            delay = d.delay_ms + (self.rng.uniform(-d.jitter_ms, d.jitter_ms)
                                  if d.jitter_ms else 0.0)
            if d.loss > 0:
                packets = max(1, math.ceil(nbytes / PACKET_BYTES))
                if self.rng.random() < 1.0 - (1.0 - d.loss) ** packets:
                    self.losses += 1
                    delay += d.stall_ms
        return max(0.0, delay) / 1e3


# ---------------------------------------------------------------------- forwarding
class _Pipe:
    """One direction of one connection: a reader paced by the shaper, a timed writer."""

    def __init__(self, conn: '_Connection', src: socket.socket, dst: socket.socket, which: str):
        self.conn, self.src, self.dst, self.which = conn, src, dst, which
        self.queue: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.last_delivery = 0.0
        self.threads = [threading.Thread(target=self._read, daemon=True,
                                         name=f'linkemu-{which}-read'),
                        threading.Thread(target=self._write, daemon=True,
                                         name=f'linkemu-{which}-write')]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _push(self, due: float, data: bytes | None) -> None:
        with self.cond:
            due = max(due, self.last_delivery)
            self.last_delivery = due
            self.queue.append((due, data))
            self.cond.notify()

    def _read(self) -> None:
        emu = self.conn.emulator
        try:
            while not self.conn.closed:
                shaper = emu.shaper(self.which)
                ahead = shaper.busy_until() - time.monotonic() - READ_AHEAD_S
                if ahead > 0:
                    time.sleep(min(ahead, 0.05))
                    continue
                data = self.src.recv(RECV_BYTES)
                now = time.monotonic()
                shaper = emu.shaper(self.which)   # the link may have changed during recv
                if not data:
                    self._push(now + shaper.direction.delay_ms / 1e3, None)
                    return
                for offset in range(0, len(data), PIECE_BYTES):
                    piece = data[offset:offset + PIECE_BYTES]
                    departed = shaper.depart(now, len(piece))
                    self._push(departed + shaper.extra_delay_s(len(piece)), piece)
        except OSError:
            self.conn.close()

    def _write(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.conn.closed:
                        self.cond.wait(0.2)
                    if self.conn.closed:
                        return
                    due = self.queue[0][0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                chunks, eof = [], False
                with self.cond:
                    now = time.monotonic()
                    while self.queue and self.queue[0][0] <= now + 1e-4:
                        _, data = self.queue.popleft()
                        if data is None:
                            eof = True
                            break
                        chunks.append(data)
                if chunks:
                    self.dst.sendall(b''.join(chunks))
                if eof:
                    self.dst.shutdown(socket.SHUT_WR)
                    self.conn.half_closed()
                    return
        except OSError:
            self.conn.close()


class _Connection:
    def __init__(self, emulator: 'LinkEmulator', client: socket.socket, server: socket.socket):
        self.emulator = emulator
        self.sockets = (client, server)
        self.closed = False
        self._halves = 0
        self._lock = threading.Lock()
        self.pipes = [_Pipe(self, client, server, 'up'), _Pipe(self, server, client, 'down')]

    def start(self) -> None:
        for pipe in self.pipes:
            pipe.start()

    def half_closed(self) -> None:
        with self._lock:
            self._halves += 1
            done = self._halves == 2
        if done:
            self.close()

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for pipe in self.pipes:
            with pipe.cond:
                pipe.cond.notify_all()
        self.emulator._forget(self)


class LinkEmulator:
    """A shaping TCP proxy from ``listen`` to ``upstream`` (see the module docstring)."""

    def __init__(self, upstream: tuple[str, int], link: LinkConfig = PRESETS['unlimited'],
                 listen: tuple[str, int] = ('127.0.0.1', 0), seed: int = 0):
        self.upstream = upstream
        self.seed = seed
        self._shapers: dict[str, Shaper] = {}
        self._conn_lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._closed = threading.Event()
        self.set_link(link)
        self._listener = socket.create_server(listen, reuse_port=False)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, daemon=True,
                                          name='linkemu-accept')
        self._acceptor.start()

    def set_link(self, link: LinkConfig) -> None:
        """Apply ``link`` from now on: its schedules start now; data in flight keeps its times."""
        now = time.monotonic()
        self.link = link
        self._shapers = {'up': Shaper(link.up, now, self.seed),
                         'down': Shaper(link.down, now, self.seed + 1)}

    def shaper(self, which: str) -> Shaper:
        return self._shapers[which]

    def stats(self) -> dict:
        """Return bytes forwarded and loss stalls per direction since the last ``set_link``."""
        return {'link': self.link.name, 'connections': len(self._connections),
                **{f'{k}_bytes': s.bytes for k, s in self._shapers.items()},
                **{f'{k}_losses': s.losses for k, s in self._shapers.items()}}

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(self, client, server)
            with self._conn_lock:
                self._connections.add(conn)
            conn.start()

    def _forget(self, conn: _Connection) -> None:
        with self._conn_lock:
            self._connections.discard(conn)

    def close(self) -> None:
        """Stop accepting and close every connection."""
        self._closed.set()
        self._listener.close()
        self._acceptor.join(timeout=2)
        with self._conn_lock:
            connections = list(self._connections)
        for conn in connections:
            conn.close()

    def __enter__(self) -> 'LinkEmulator':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------- separate process
class EmulatorProcess:
    """``python -m bench.linkemu --control`` in a child process, so it costs the robot no CPU."""

    def __init__(self, upstream: tuple[str, int], link: LinkConfig = PRESETS['unlimited'],
                 seed: int = 0, python: str = sys.executable, env: dict | None = None):
        cmd = [python, '-m', 'bench.linkemu', '--control', '--seed', str(seed),
               '--upstream', f'{upstream[0]}:{upstream[1]}', '--link-json',
               json.dumps(link.to_json())]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1, env=env)
        self.port = self._reply(timeout_s=30)['port']

    def _reply(self, timeout_s: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ''
        if not line:
            self.close()
            raise RuntimeError('link emulator did not answer')
        reply = json.loads(line)
        if not reply.get('ok'):
            raise RuntimeError(f'link emulator: {reply.get("error")}')
        return reply

    def command(self, cmd: str, timeout_s: float = 30, **fields: Any) -> dict:
        self.proc.stdin.write(json.dumps({'cmd': cmd, **fields}) + '\n')
        self.proc.stdin.flush()
        return self._reply(timeout_s)

    def set_link(self, link: LinkConfig) -> None:
        self.command('set', link=link.to_json())

    def stats(self) -> dict:
        return self.command('stats')['stats']

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({'cmd': 'stop'}) + '\n')
                self.proc.stdin.flush()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> 'EmulatorProcess':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------- command line
def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(':')
    return host or '127.0.0.1', int(port)


def _link_from_args(args: argparse.Namespace) -> LinkConfig:
    if args.link_json:
        return LinkConfig.from_json(json.loads(args.link_json))
    if args.preset:
        return PRESETS[args.preset]
    rate = down = None
    if args.rate is not None:
        rate = {'mbps': args.rate}
    elif args.steps:
        rate = {'steps': [[float(x) for x in s.split(':')] for s in args.steps.split(',')]}
    elif args.trace:
        rate = {'trace': args.trace, 'offset_s': args.offset_s}
        down = {'trace': args.down_trace or args.trace, 'offset_s': args.offset_s}
    if args.down_rate is not None:
        down = {'mbps': args.down_rate}
    return symmetric('cli', rate, args.rtt_ms, args.jitter_ms, args.loss, args.stall_ms,
                     down_rate=down)


def _serve_control(emu: LinkEmulator) -> None:
    for line in sys.stdin:
        try:
            request = json.loads(line)
            if request['cmd'] == 'stop':
                break
            if request['cmd'] == 'set':
                emu.set_link(LinkConfig.from_json(request['link']))
                reply = {'ok': True}
            elif request['cmd'] == 'stats':
                reply = {'ok': True, 'stats': emu.stats()}
            else:
                reply = {'ok': False, 'error': f'unknown command {request["cmd"]!r}'}
        except (ValueError, KeyError, TypeError, OSError) as exc:
            reply = {'ok': False, 'error': f'{type(exc).__name__}: {exc}'}
        print(json.dumps(reply), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m bench.linkemu', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--upstream', required=True, help='server HOST:PORT')
    parser.add_argument('--listen', default='127.0.0.1:0', help='HOST:PORT for the robot')
    parser.add_argument('--preset', choices=sorted(PRESETS))
    parser.add_argument('--rate', type=float, help='Mbit/s both ways (or uplink with --down-rate)')
    parser.add_argument('--down-rate', type=float, help='downlink Mbit/s')
    parser.add_argument('--steps', help='MBPS:SECONDS,... looping, e.g. 100:3,5:3,50:3')
    parser.add_argument('--trace', help='uplink trace (path or relative to the traces folder)')
    parser.add_argument('--down-trace', help='downlink trace (default: the uplink trace)')
    parser.add_argument('--offset-s', type=float, default=0.0, help='start this far into traces')
    parser.add_argument('--rtt-ms', type=float, default=0.0)
    parser.add_argument('--jitter-ms', type=float, default=0.0)
    parser.add_argument('--loss', type=float, default=0.0, help='per-packet loss probability')
    parser.add_argument('--stall-ms', type=float, default=200.0, help='stall per lost packet')
    parser.add_argument('--link-json', help=argparse.SUPPRESS)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--control', action='store_true',
                        help='read JSON commands (set, stats, stop) on stdin, answer on stdout')
    args = parser.parse_args(argv)
    try:
        link = _link_from_args(args)
        emu = LinkEmulator(_address(args.upstream), link, _address(args.listen), args.seed)
    except (ValueError, OSError) as exc:
        parser.exit(2, f'linkemu: {exc}\n')
    with emu:
        if args.control:
            print(json.dumps({'ok': True, 'port': emu.port}), flush=True)
            _serve_control(emu)
        else:
            print(f'linkemu: 127.0.0.1:{emu.port} -> {args.upstream}: {link}', flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == '__main__':
    sys.exit(main())
