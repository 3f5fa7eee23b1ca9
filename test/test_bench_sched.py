"""The scheduler benchmarks run end to end (scaled down) and account for every frame."""

import json
import time

import pytest

from bench import preempt_latency, sched_mix

OUTCOMES = ('ok', 'late', 'dropped', 'skipped', 'error', 'timeout')


@pytest.mark.slow
def test_mixed_workload_compares_policies_and_accounts_for_every_release(tmp_path):
    out = tmp_path / 'sched.json'
    results = sched_mix.main(['--preset', 'tiny', '--duration', '1.5', '--clients', 'threads',
                              '--policies', 'fifo', 'preemptive', '--solo', '--trace', '400',
                              '--out', str(out)])
    assert json.loads(out.read_text()) == results
    json.dumps(results, allow_nan=False)
    for label, run in results['runs'].items():
        assert run['scheduler']['policy'] == label
        for name, task in run['tasks'].items():
            assert task['releases'] > 0
            assert sum(task[o] for o in OUTCOMES) == task['releases']
            assert task['error'] == task['timeout'] == 0, (label, name, task)
            assert task['throughput_hz'] > 0
            stages = task['stages_ms']      # where answered requests spent their time
            assert set(stages) == {'prepare', 'device_wait', 'compute', 'reply', 'wire'}
            assert stages['compute'] > 0 and stages['prepare'] > 0 and stages['wire'] > 0
            tail = task['stages_p90_ms']    # and the slow tenth, stage by stage
            assert set(tail) == set(stages) and tail['wire'] >= stages['wire']
            assert set(task['late_stages_ms']) == set(stages)
            missed = task['missed_releases']     # each with its times, to place on the trace
            assert len(missed) == task['late'] + task['dropped']
            assert all(r['release'] <= r['send'] <= r['end'] for r in missed)
        assert run['gc']['2']['collections'] >= 0 and isinstance(run['gc_pauses'], list)
        trace, epoch = run['scheduler']['trace'], run['scheduler']['epoch']
        assert 0 < len(trace) <= 400 and all(e['end_ms'] >= e['start_ms'] for e in trace)
        assert abs(epoch + trace[-1]['end_ms'] / 1e3 - time.monotonic()) < 600, \
            'the trace is on the clients\' monotonic clock'
        detect = run['tasks']['detect']
        assert 0.0 <= detect['miss_rate'] <= 1.0
        assert run['tasks']['mapping']['miss_rate'] is None     # best effort: no deadline
    assert results['runs']['fifo']['scheduler']['preemptions'] == 0
    assert results['runs']['preemptive']['scheduler']['preemptions'] > 0
    assert '| preemptive | detect |' in sched_mix.table(results)
    solo = results['solo']
    assert list(solo) == ['detect'], 'only periodic tasks run alone'
    assert list(solo['detect']['tasks']) == ['detect'] and '| solo | detect |' in \
        sched_mix.table(results)


@pytest.mark.slow
def test_preemption_latency_benchmark_reports_a_distribution(tmp_path):
    out = tmp_path / 'preempt.json'
    results = preempt_latency.main(['--arch', 'resnet18', '--granularity', 'ops:5',
                                    '--batch', '1', '--duration', '1.5', '--clients',
                                    'threads', '--out', str(out)])
    (row,) = results['rows']
    assert row['segments'] > 1 and row['max_segment_ms'] > 0
    assert row['preempt_ms']['n'] > 0
    assert row['preempt_ms']['p50'] <= row['preempt_ms']['p99'] <= row['preempt_ms']['max']
    assert row['low_inferences'] > 0
    assert json.loads(out.read_text()) == results


def test_a_missed_release_is_placed_on_the_server_trace():
    """Receipt = the job's first step less its queue time; what the lanes ran before it."""
    trace = [{'lane': 0, 'task': 'mapping', 'job': 7, 'start_ms': 0.0, 'end_ms': 4.0},
             {'lane': 0, 'task': 'detect', 'job': 8, 'start_ms': 5.0, 'end_ms': 6.0},
             {'lane': 0, 'task': 'detect', 'job': 9, 'start_ms': 6.5, 'end_ms': 6.7}]
    missed = {'outcome': 'late', 'release': 99.9985, 'send': 99.999, 'end': 100.0075,
              'server': {'queue_ms': 1.5, 'compute_ms': 1.0, 'server_ms': 2.7}}
    dropped = {'outcome': 'dropped', 'release': 100.0, 'send': 100.0, 'end': 100.002,
               'server': {'message': 'deadline passed'}}
    run = {'scheduler': {'epoch': 100.0, 'trace': trace},
           'gc_pauses': [{'start': 100.0025, 'ms': 2.0, 'generation': 2}],
           'tasks': {'detect': {'missed_releases': [missed, dropped]}}}
    late, drop = sched_mix.place_missed(run, 'detect')
    assert late['inbound_ms'] == pytest.approx(4.5)       # receipt at 103.5 ms
    assert late['outbound_ms'] == pytest.approx(8.5 - 4.5 - 2.7)
    assert late['lanes_busy_ms'] == pytest.approx(3.5) and late['lanes'] == ['mapping']
    assert late['gc_ms'] == pytest.approx(1.0)           # the part before receipt
    assert drop == {'outcome': 'dropped', 'wall_ms': pytest.approx(2.0)}
    assert sched_mix.place_missed({'scheduler': {}, 'tasks': {}}, 'detect') == []
    assert 'inbound_ms 4.50' in sched_mix.explain({'runs': {'preemptive': run}})
