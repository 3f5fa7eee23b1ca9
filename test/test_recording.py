"""Recordings shared by the requests waiting for one replay key (rrto_server.recording)."""

from types import SimpleNamespace

from rrto_server.recording import Recordings
from rrto_wire.messages import RecordOptions


class _Request:
    client = None

    def __init__(self):
        self.answers = []

    def ok(self, **fields):
        self.answers.append(('ok', fields))

    def error(self, error):
        self.answers.append(('error', error))


def _replay(key):
    return SimpleNamespace(key=key, record_ms=1.0, num_segments=1, backend='fx', nbytes=8,
                           model=SimpleNamespace(label='m'), utilisation=None,
                           segment_ms=[1.0])


def _join(recordings, request, ticket, cached=None):
    return recordings.join('k', 'digest', (), RecordOptions(), request, ticket,
                           lambda: cached)


def test_a_request_joining_after_the_recording_finished_gets_the_replay_not_a_new_recording():
    """r4 B5: a join between another ticket's finish and this request's claim recorded twice."""
    recordings = Recordings()
    first = _Request()
    recording = _join(recordings, first, 'alice')
    assert recording is not None
    recording.replay, recording.done = _replay('k'), True
    recordings.finish(recording)            # the replay is in the cache from here on
    assert first.answers[0][0] == 'ok' and first.answers[0][1]['recorded'] is True
    late = _Request()
    assert _join(recordings, late, 'bob', cached=_replay('k')) is None
    assert late.answers == [('ok', late.answers[0][1])]
    assert late.answers[0][1]['recorded'] is False and late.answers[0][1]['replay'] == 'k'
    again = _Request()                      # no recording was left behind for the key
    assert _join(recordings, again, 'carol') is not None and again.answers == []


def test_requests_of_one_key_share_its_ticket_and_each_key_gets_its_own():
    recordings = Recordings()
    a1, a2, b1 = _Request(), _Request(), _Request()
    recording = _join(recordings, a1, 'alice')
    assert recording is not None
    assert _join(recordings, a2, 'alice') is None            # alice's ticket is already due
    assert _join(recordings, b1, 'bob') is recording         # bob's ticket joins the same one
    recording.replay, recording.done = _replay('k'), True
    recordings.finish(recording)
    assert [r.answers[0][0] for r in (a1, a2, b1)] == ['ok', 'ok', 'ok']
