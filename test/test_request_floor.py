"""
The server's request path at the floor (issue 11): no more work per request than it needs.

What runs between the socket becoming readable and the reply handed to libzmq
is what a robot waits for: the receive ends on the last waiting message
without an exception, frames go in and out with the least Python, and the
bookkeeping that no reply needs runs after the reply is sent.
"""

from __future__ import annotations

import sys
import time

import torch
import zmq
from rrto_testing import prepare

from rrto_ros.client import RrtoClient
from rrto_ros.zoo import keypoint_net
from rrto_server.conn_watchdog import ConnectionWatchdog
from rrto_server.outbox import readable, receive, send


def _exceptions(call) -> list[str]:
    """Return the names of the exceptions raised in Python frames while ``call()`` runs."""
    seen = []

    def trace(frame, event, arg):
        if event == 'exception':
            seen.append(arg[0].__name__)
        return trace
    sys.settrace(trace)
    try:
        call()
    finally:
        sys.settrace(None)
    return seen


def _router_and_peer(ctx: zmq.Context):
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    watchdog = ConnectionWatchdog(router, 1 << 20, 'tcp://127.0.0.1:0')
    router.bind('tcp://127.0.0.1:0')
    peer = ctx.socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(router.last_endpoint.decode())
    return router, watchdog, peer


def test_the_receive_ends_on_the_last_waiting_message_without_an_exception():
    ctx = zmq.Context()
    router, watchdog, peer = _router_and_peer(ctx)
    poller = zmq.Poller()
    for sock in (*watchdog.sockets, router):
        poller.register(sock, zmq.POLLIN)
    try:
        peer.send(b'hello')             # the connection's events (read until zmq.Again) first
        deadline = time.monotonic() + 5
        while not watchdog.drain(dict(poller.poll(100)), 64) and time.monotonic() < deadline:
            pass
        peer.send_multipart([b'header', b'x' * 150_000])
        events = dict(poller.poll(5000))
        batch = []
        raised = _exceptions(lambda: batch.extend(watchdog.drain(events, 64)))
        assert [[len(f) for f in frames[1:]] for frames in batch] == [[6, 150_000]]
        assert raised == [], 'an idle socket costs no zmq.Again per request'
        # a burst is still received in one drain, in order
        for i in range(3):
            peer.send_multipart([b'%d' % i, b'y'])
        deadline = time.monotonic() + 5
        got = []
        while len(got) < 3 and time.monotonic() < deadline:
            got += [frames[1].bytes for frames in watchdog.drain(dict(poller.poll(100)), 64)]
        assert got == [b'0', b'1', b'2']
    finally:
        watchdog.close()
        peer.close(0)
        router.close(0)
        ctx.term()


def test_frames_go_in_and_out_whole():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind('inproc://floor-frames')
        b.connect('inproc://floor-frames')
        assert not readable(b)
        send(a, [b'one', memoryview(b'two'), zmq.Frame(b'three')])
        assert b.poll(5000) and readable(b)
        assert [f.bytes for f in receive(b)] == [b'one', b'two', b'three']
        assert not readable(b)
        try:
            send(a, [b'head', object()])        # nothing is sent of a message with a non-buffer
        except TypeError:
            pass
        else:
            raise AssertionError('a non-buffer frame was sent')
        send(a, [b'next'])
        assert b.poll(5000) and [f.bytes for f in receive(b)] == [b'next']
        try:
            receive(b)
        except zmq.Again:
            pass
        else:
            raise AssertionError('receive on an empty socket must raise zmq.Again')
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


def _express_server(make_server):
    """Return a CPU server with keypoint_net recorded, its replay, the input and a client."""
    server = make_server(inline_max_ms=1000.0)
    x = torch.randn(1, 3, 32, 32)
    replay = prepare(server.endpoint, keypoint_net(), x)
    client = RrtoClient(server.endpoint, call_timeout_ms=30000)
    client.infer(replay, [x])
    return server, replay, x, client


def test_the_receipt_is_stamped_when_the_poll_finds_the_request(make_server, monkeypatch):
    server, replay, x, client = _express_server(make_server)
    drain = server.watchdog.drain

    def slow_drain(events, most=None):
        batch = drain(events, most)
        if batch:
            time.sleep(0.05)        # whatever runs between the poll and the dispatch
        return batch
    try:
        monkeypatch.setattr(server.watchdog, 'drain', slow_drain)
        _, reply = client.infer(replay, [x])
        assert reply['server_ms'] >= 50.0, 'the wait before dispatch is the server\'s time'
    finally:
        client.close()


def _settled(server) -> int:
    """Return the ok replies counted, once the last request's bookkeeping is done."""
    deadline = time.monotonic() + 5
    while server.guard.admission.in_flight and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.05)
    return server.stats.snapshot()['replies'].get('ok', 0)


def test_the_reply_is_sent_before_it_is_counted(make_server, monkeypatch):
    server, replay, x, client = _express_server(make_server)
    send = server.replies.send
    at_send = []

    def spy(frames, nbytes):
        at_send.append((server.stats.snapshot()['replies'].get('ok', 0),
                        server.guard.admission.in_flight))
        return send(frames, nbytes)
    try:
        before = _settled(server)   # the reply may reach the client before it is counted
        monkeypatch.setattr(server.replies, 'send', spy)
        client.infer(replay, [x])
        assert at_send == [(before, 1)], 'counted (and released) only after the send'
        assert _settled(server) == before + 1
        assert server.guard.admission.in_flight == 0
    finally:
        client.close()
