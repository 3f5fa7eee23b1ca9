"""Helpers shared by the tests: free ports, server processes, raw sockets."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import msgspec
import torch
import zmq
import zmq.auth

from rrto_wire import messages, replies, treespec
from rrto_wire.curve import ClientKeys
from rrto_wire import protocol as wire
from rrto_wire.errors import ProtocolError
from rrto_server.process import ServerProcess, child_env, free_port  # noqa: F401
from rrto_wire.hello import hello  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def client_certificates(tmp_path: Path, grants: dict) -> tuple[Path, dict]:
    """
    Make a server key folder with one client certificate per grant.

    Returns the folder (``server.key`` and ``clients/<name>.key`` + ``<name>.json``
    holding the grant) and each client's ``ClientKeys`` by name.
    """
    keys = tmp_path / 'keys'
    (keys / 'clients').mkdir(parents=True)
    zmq.auth.create_certificates(keys, 'server')
    client_keys = {}
    for name, grant in grants.items():
        (tmp_path / name).mkdir()
        zmq.auth.create_certificates(tmp_path / name, name)
        shutil.copy(tmp_path / name / f'{name}.key', keys / 'clients' / f'{name}.key')
        (keys / 'clients' / f'{name}.json').write_text(json.dumps(grant))
        client_keys[name] = ClientKeys.load(keys / 'server.key',
                                            tmp_path / name / f'{name}.key_secret')
    return keys, client_keys


def raw_socket(ctx: zmq.Context, endpoint: str, kind: int = zmq.DEALER) -> zmq.Socket:
    """Return a connected socket with LINGER=0 for sending hand-made messages."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def reply_header(frame, kind: str | None = 'infer') -> dict:
    """Decode a reply to a ``kind`` request strictly, as the client does, into plain data."""
    return msgspec.to_builtins(replies.decode_reply(frame, kind and messages.Kind(kind)))


def exchange(sock: zmq.Socket, frames: list, timeout_ms: int = 5000) -> dict:
    """Send raw frames and return the decoded reply header (fail the test on silence)."""
    try:
        kind = messages.decode_request(frames[0]).__struct_config__.tag
    except (ProtocolError, IndexError):
        kind = None               # a malformed request: only an error reply is valid
    sock.send_multipart(frames)
    assert sock.poll(timeout_ms), 'server did not reply'
    return reply_header(sock.recv_multipart()[0], kind)


def assert_packing_invariant(trace: list[dict], theta: float) -> int:
    """
    Check a scheduler trace: steps that overlapped in time fit together under ``theta``.

    Return the number of overlapping pairs (steps that really ran side by side).
    """
    pairs = 0
    by_lane: dict[int, list[dict]] = {}
    for entry in trace:
        by_lane.setdefault(entry['lane'], []).append(entry)
    lanes = sorted(by_lane)
    for i, lane in enumerate(lanes):
        for other in lanes[i + 1:]:
            for a in by_lane[lane]:
                for b in by_lane[other]:
                    if a['start_ms'] < b['end_ms'] and b['start_ms'] < a['end_ms']:
                        pairs += 1
                        assert a['util'] is not None and b['util'] is not None, (a, b)
                        assert a['util'] + b['util'] <= theta + 1e-9, (a, b)
                        assert a['job'] != b['job'], (a, b)
    return pairs


class SentReplies:
    """A reply sender, as a server Request takes it, that keeps what it was given."""

    def __init__(self):
        self.messages = []

    def send(self, frames, nbytes):
        self.messages.append(frames)


def upload(endpoint: str, model, x: torch.Tensor):
    """Upload ``model`` exported for ``x``'s signature; return its artifact."""
    from rrto_ros.client import RrtoClient
    from rrto_ros.local_model import TorchModule
    client = RrtoClient(endpoint, call_timeout_ms=120000)
    try:
        flat, spec = treespec.flatten(((x,), {}))
        artifact = TorchModule(model).artifact(flat, spec)
        client.hello()
        client.upload(artifact.blobs)
        return artifact
    finally:
        client.close()


def prepare(endpoint: str, model, x: torch.Tensor, **options) -> str:
    """Upload and record ``model`` for ``x``'s signature; return the replay id."""
    from rrto_ros.client import RrtoClient
    artifact = upload(endpoint, model, x)
    client = RrtoClient(endpoint, call_timeout_ms=120000)
    try:
        return client.record(artifact.model, artifact.signature, options)['replay']
    finally:
        client.close()


def infer_frames(request_id, replay: str, x: torch.Tensor, **fields) -> list:
    """Return the frames of an INFER request with extra header ``fields``."""
    header = {'kind': 'infer', 'id': request_id, 'replay': replay}
    header.update(fields)
    return wire.encode(header, [x])


def reply_and_tensors(frames: list, kind: str = 'infer') -> tuple[dict, list]:
    """Decode a received reply to a ``kind`` request: its header as plain data, its tensors."""
    header = replies.decode_reply(frames[0], messages.Kind(kind))
    return msgspec.to_builtins(header), wire.decode_tensors(header.tensors, frames[1:], 1 << 30)


def receive(sock, timeout_ms: int = 30000) -> tuple[dict, list]:
    """Return the next reply's header and tensors (fail the test on silence)."""
    assert sock.poll(timeout_ms), 'no reply'
    return reply_and_tensors(sock.recv_multipart())


def leaves(outputs) -> list:
    """Return the tensors of a nested output structure, in order."""
    return treespec.flatten(outputs)[0]


def wait_running(server, task: str, timeout: float = 30.0) -> None:
    """Wait until an in-process server's scheduler runs a step of ``task``."""
    deadline = time.monotonic() + timeout
    while not any(r['task'] == task for r in server.scheduler.running()):
        assert time.monotonic() < deadline, f'{task} never started'
        time.sleep(0.0005)


def assert_same_as_local(actual, expected) -> None:
    """Check offloaded fp32 outputs (tensors, dicts, tuples) against local ones.

    rtol 1e-5, with an absolute floor at 1e-5 of each tensor's largest magnitude: two
    processes may sum a convolution in a different order, and near-zero elements then
    differ in their last bits only.
    """
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys()
        for key in expected:
            assert_same_as_local(actual[key], expected[key])
    elif isinstance(expected, (tuple, list)):
        assert type(actual) is type(expected) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_same_as_local(a, e)
    else:
        floor = 1e-5 * float(expected.abs().max()) if expected.numel() else 0.0
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=floor)


def call_concurrently(endpoint: str, calls: dict, seconds: float) -> list[str]:
    """Run one client thread per label, each inferring its replay back to back.

    ``calls`` maps a label (also the task name) to ``(replay, x, priority,
    expected)``; ``expected`` None means the label's first reply.  Returns the
    labels of every reply that differed from the expected outputs.
    """
    import threading

    from rrto_ros.client import RrtoClient
    stop = time.monotonic() + seconds
    failures = []

    def client(label: str) -> None:
        replay, x, priority, expected = calls[label]
        rrto = RrtoClient(endpoint, call_timeout_ms=60000, name=label)
        try:
            if expected is None:
                expected, _ = rrto.infer(replay, [x], task=label)
            while time.monotonic() < stop:
                outputs, _ = rrto.infer(replay, [x], priority=priority, task=label)
                if not all(torch.equal(a, b) for a, b in zip(outputs, expected)):
                    failures.append(label)
        finally:
            rrto.close()

    threads = [threading.Thread(target=client, args=(label,)) for label in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 120)
    return failures


class WatchedRouter:
    """
    A ROUTER with a connection watchdog and an I/O loop as the server's, ``most`` a poll.

    Each batch costs the loop ``busy_s`` (``per_message``: that much per message
    received, handling slower than receiving); ``hwm`` is the receive high-water
    mark (0: unbounded, None: libzmq's default).
    """

    def __init__(self, ctx: zmq.Context, most: int = 64, busy_s: float = 0.0,
                 per_message: bool = False, hwm: int | None = 0):
        from rrto_server.conn_watchdog import ConnectionWatchdog
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        if hwm is not None:
            self.router.setsockopt(zmq.RCVHWM, hwm)
        self.watchdog = ConnectionWatchdog(self.router, 1 << 20, 'tcp://127.0.0.1:0')
        self.router.bind('tcp://127.0.0.1:0')
        self.endpoint = self.router.last_endpoint.decode()
        self.poller = zmq.Poller()
        for sock in self.watchdog.sockets:
            self.poller.register(sock, zmq.POLLIN)
        self.poller.register(self.router, zmq.POLLIN)
        self.most, self.busy_s, self.per_message = most, busy_s, per_message

    def serve(self, seconds: float, until=lambda: False) -> int:
        """Serve for ``seconds`` or until ``until()``; return the messages received."""
        received = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not until():
            batch = self.watchdog.drain(dict(self.poller.poll(50)), self.most)
            received += len(batch)
            time.sleep(self.busy_s * (len(batch) if self.per_message else 1))
        return received

    def close(self) -> None:
        self.watchdog.close()
        self.router.close(linger=0)


class SlowPort:
    """A fleet replica whose warms take ``seconds`` each, logged in the order they start."""

    def __init__(self, seconds: float):
        self.seconds, self.started, self.replays = seconds, [], []
        self.lock = threading.Lock()

    def warm(self, model, signature, options):
        with self.lock:
            self.started.append(model)
        time.sleep(self.seconds)
        with self.lock:
            self.replays.append(f'{model}|{json.dumps(options, sort_keys=True)}')
            return {'replay': self.replays[-1]}

    def load(self):
        with self.lock:
            return {'instance': 'a', 'endpoint': 'tcp://a:1', 'infers': {},
                    'replays': list(self.replays)}


def reply_guard_watchers() -> set:
    """Return the robot's reply-guard watch threads now alive (one per guarded socket)."""
    import threading
    return {t for t in threading.enumerate() if t.name == 'rrto-reply-guard'}


def tcp_descriptors(port: int, end: str = 'remote') -> int:
    """
    Return how many of this process's descriptors are TCP sockets with ``port`` at one end.

    ``end``: 'local' (bound to ``port`` here) or 'remote' (connected to ``port``);
    IPv4 and IPv6.  Counts duplicates of one connection too (each is a descriptor).
    """
    column = {'local': 1, 'remote': 2}[end]
    inodes = set()
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[column].rsplit(':', 1)[1], 16) == port:
                inodes.add(f'socket:[{fields[9]}]')
    count = 0
    for fd in Path('/proc/self/fd').iterdir():
        try:
            count += os.readlink(fd) in inodes
        except OSError:
            pass
    return count


def stream_unfinished_reply(listener, sent: list, part_bytes: int, pace_s: float,
                            parts: int | None = None, stop: threading.Event | None = None
                            ) -> None:
    """
    Answer one request on ``listener`` as a hostile server: a header, then parts, never the last.

    ``part_bytes`` a part every ``pace_s`` until ``parts`` were sent or ``stop`` is
    set (None: no such limit); ``sent[0]`` counts the parts' bytes; ends quietly
    when the robot drops the connection.
    """
    from bench.transport_hold import part, read_message, zmtp_handshake
    conn, _ = listener.accept()
    with conn:
        zmtp_handshake(conn, b'ROUTER')
        read_message(conn)
        chunk = part(bytes(part_bytes))
        try:
            conn.sendall(part(b'{"kind":"ok","id":1}'))
            count = 0
            while (parts is None or count < parts) and not (stop and stop.is_set()):
                conn.sendall(chunk)
                sent[0] += len(chunk)
                count += 1
                time.sleep(pace_s)
        except OSError:
            pass                                # the robot dropped the connection
