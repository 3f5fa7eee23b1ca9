"""Host buffers: output sets reused, never while a reply needs them; staging copies of inputs."""

import threading
import time

import pytest
import torch
import zmq

from rrto_server.host_buffers import OutputBuffers


def _plain(shape, dtype):
    return torch.empty(shape, dtype=dtype)   # CPU CI has no page-locked memory


class Tracker:
    def __init__(self, done=False):
        self.done = done


def pool(max_sets=2, max_bytes=1 << 20):
    return OutputBuffers([((2, 3), torch.float32), ((5,), torch.int64)], max_sets=max_sets,
                         max_bytes=max_bytes, allocate=_plain)


def test_held_sets_are_never_handed_out_twice():
    buffers = pool(max_sets=3)
    sets = [buffers.acquire() for _ in range(3)]
    assert all(s is not None for s in sets)
    pointers = {t.data_ptr() for s in sets for t in s.tensors}
    assert len(pointers) == 6
    assert [tuple(t.shape) for t in sets[0].tensors] == [(2, 3), (5,)]
    assert sets[0].nbytes == 2 * 3 * 4 + 5 * 8


def test_a_released_set_is_reused_and_the_pool_does_not_grow():
    buffers = pool()
    first = buffers.acquire()
    first.release()
    assert buffers.acquire() is first
    assert len(buffers) == 1


def test_a_set_with_a_frame_in_flight_waits_for_its_tracker():
    buffers = pool(max_sets=2)
    first = buffers.acquire()
    tracker = Tracker()
    first.release([tracker])
    second = buffers.acquire()
    assert second is not first            # libzmq still sends from the first set
    second.release()
    assert buffers.acquire() is second
    tracker.done = True
    assert buffers.acquire() is first


def test_all_sets_in_flight_gives_none_and_counts_a_miss():
    buffers = pool(max_sets=2)
    held = [buffers.acquire(), buffers.acquire()]
    assert buffers.acquire() is None
    assert buffers.misses == 1
    held[0].release()
    assert buffers.acquire() is held[0]


def test_outputs_larger_than_the_cap_get_no_set():
    buffers = OutputBuffers([((1024,), torch.float32)], max_bytes=1000, allocate=_plain)
    assert not buffers.enabled
    assert buffers.acquire() is None
    assert len(buffers) == 0


def test_releasing_twice_is_a_bug():
    buffers = pool()
    held = buffers.acquire()
    held.release()
    with pytest.raises(RuntimeError):
        held.release()


def test_concurrent_requests_never_share_a_set():
    buffers = pool(max_sets=4)
    seen, errors = [], []
    owners = {}
    lock = threading.Lock()

    def request(worker):
        for i in range(200):
            held = buffers.acquire()
            if held is None:
                continue
            with lock:
                if id(held) in owners:
                    errors.append((worker, i))
                owners[id(held)] = worker
            held.tensors[0].fill_(worker)
            seen.append(float(held.tensors[0][0, 0]) == worker)
            with lock:
                del owners[id(held)]
            held.release()

    threads = [threading.Thread(target=request, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert seen and all(seen)
    assert len(buffers) <= 4


def test_a_zero_copy_frame_through_an_inproc_hop_is_tracked_until_released():
    """The server's worker -> I/O thread hand-over keeps the frame's memory until the end."""
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind('inproc://tracker-test')
    push.connect('inproc://tracker-test')
    try:
        payload = torch.arange(1 << 18, dtype=torch.float32)    # 1 MiB
        frame = zmq.Frame(memoryview(payload.numpy()).cast('B'), copy=False, track=True)
        tracker = frame.tracker
        push.send_multipart([b'header', frame], copy=False)
        del frame
        received = pull.recv_multipart(copy=False)
        time.sleep(0.05)
        assert not tracker.done          # the received frame still points into the buffer
        assert received[1].buffer.tobytes() == payload.numpy().tobytes()
        del received
        tracker.wait(5)
        assert tracker.done
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()


def test_a_reply_tells_on_sent_when_its_memory_may_be_reused():
    """Large replies hand over a tracker (done once libzmq let go), small ones None, once."""
    from rrto_server.requests import OpenRequests, ReplySender, Request
    from rrto_server.stats import ServerStats
    from rrto_wire.limits import COPY_THRESHOLD
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    router.copy_threshold = COPY_THRESHOLD
    port = router.bind_to_random_port('tcp://127.0.0.1')
    dealer.connect(f'tcp://127.0.0.1:{port}')
    stats, registry = ServerStats(), OpenRequests()
    sender = ReplySender(ctx, router, stats, peer_bytes=64 << 20)
    sender.io_thread = threading.get_ident()
    try:
        told = []
        for size, from_worker in ((3 << 20, False), (3 << 20, True), (1000, False)):
            dealer.send(b'request')
            envelope = router.recv_multipart(copy=False)[:1]
            request = Request(envelope, time.perf_counter(), 0, sender, registry, stats)
            payload = torch.arange(size // 4, dtype=torch.float32)
            if from_worker:       # a CPU worker's reply goes through the I/O thread's outbox
                worker = threading.Thread(target=request.ok, args=([payload], told.append))
                worker.start()
                worker.join()
                assert sender.outbox.poll(5000)
                sender.flush()
            else:
                request.ok([payload], on_sent=told.append)
            assert dealer.poll(5000)
            reply = dealer.recv_multipart()
            assert reply[-1] == payload.numpy().tobytes()
            tracker = told[-1]
            if size >= COPY_THRESHOLD:
                tracker.wait(5)
                assert tracker.done
            else:
                assert tracker is None      # copied while sent: free at once
            request.ok(on_sent=told.append)  # a second answer is dropped, and still told
            assert told[-1] is None
        assert len(told) == 6
    finally:
        sender.close()
        dealer.close(0)
        router.close(0)
        ctx.term()


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.uint8, torch.bool,
                                   torch.int64, torch.float16])
def test_staging_copies_the_bytes_of_every_dtype_and_layout(dtype):
    from rrto_server.transfers import byte_view, copy_bytes
    source = (torch.randn(2, 5, 7) * 100).to(dtype)
    for tensor in (source, source.transpose(0, 2), source[0, 0, 0]):
        staging = torch.empty(tensor.shape, dtype=dtype)
        view = byte_view(staging)
        copy_bytes(view, tensor)
        assert torch.equal(staging, tensor), (dtype, tensor.shape)
        assert view.ctypes.data == staging.data_ptr(), 'a view, not a copy'
