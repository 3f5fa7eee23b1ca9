"""The nodes as separate processes on a private ROS domain: what a ROS user sees."""

import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from sensor_msgs.msg import Image
from std_msgs.msg import Float32MultiArray

from rrto_ros.image import ImageConverter, array_to_image
from rrto_ros.latency import KEYS, parse_values
from rrto_ros.nodes import messages as m
from rrto_ros.preprocess import WithImageInput
from rrto_ros.zoo import keypoint_net
from rrto_testing import assert_same_as_local

MODEL = 'python:rrto_ros.zoo:keypoint_net'
OUTPUTS = {'heatmaps': [1, 17, 16, 16], 'offsets': [1, 34, 16, 16], 'boxes': [1, 4, 16, 16],
           'score': [1, 1]}
LABELS = {4: ['batch', 'channel', 'height', 'width'], 2: ['batch', 'feature']}
pytestmark = pytest.mark.slow


def _records(statuses):
    return [parse_values(m.values_of(s)) for s in statuses]


def _logs(*procs):
    return lambda: '\n'.join(f'--- {p.module}\n{p.output()[-3000:]}' for p in procs)


def test_camera_sim_to_offload_node_outputs_and_latency_records(
        server_process, ros_nodes, listener):
    server = server_process(None, None, '--device', 'cpu')
    camera = ros_nodes('camera_sim', width=96, height=72, rate_hz=8.0, encoding='bgr8',
                       topic='/cam/image')
    offload = ros_nodes('offload_node', server=server.endpoint, model=MODEL,
                        input_topic='/cam/image', resize_height=64, resize_width=64,
                        channel_order='rgb', timeout_ms=3000.0)
    monitor = ros_nodes('bandwidth_monitor', server=server.endpoint, probe_rate_hz=4.0)
    logs = _logs(camera, offload, monitor)
    latency = listener.subscribe(DiagnosticStatus, '/rrto/latency', m.LATENCY_QOS)
    bandwidth = listener.subscribe(DiagnosticStatus, '/rrto/bandwidth', m.STATUS_QOS)
    diagnostics = listener.subscribe(DiagnosticArray, '/diagnostics', m.DIAGNOSTICS_QOS)
    frames = listener.subscribe(Image, '/cam/image', m.IMAGE_QOS)
    outputs = {name: listener.subscribe(Float32MultiArray, f'/offload_node/output/{name}',
                                        m.OUTPUT_QOS) for name in OUTPUTS}

    def offloaded_with_bandwidth():
        done = [r for r in _records(latency) if r['result'] == 'offloaded']
        return len(done) >= 3 and not math.isnan(done[-1]['bandwidth_mbps']) and done

    done = listener.wait_for(offloaded_with_bandwidth, 120, 'offloaded records', logs)
    records = _records(latency)
    assert all(set(KEYS) <= set(r) for r in records)
    stamps = {f'{f.header.stamp.sec}.{f.header.stamp.nanosec:09d}' for f in frames}
    assert any(r['stamp'] in stamps for r in done), 'records name the input frame'
    for r in done:
        parts = (r['network_ms'], r['server_queue_ms'], r['server_compute_ms'],
                 r['robot_compute_ms'])
        assert all(p >= 0 for p in parts) and sum(parts) <= r['total_ms'] + 0.01, r
        assert r['round_trips'] == 1 and r['fallback'] is False and r['plan'] == 'offload'
        assert r['server_queue_ms'] + r['server_compute_ms'] <= r['server_ms'] + 0.01
        total = r['network_ms'] + r['server_ms'] + r['robot_compute_ms']
        assert total == pytest.approx(r['total_ms'], abs=0.01), r
        assert r['task'] == 'keypoint_net' and r['server'] == server.endpoint
        assert r['age_ms'] >= r['total_ms'] > 0 and r['preprocess_ms'] > 0
        # the 64x64x3 frame travels as uint8, not as a float tensor
        assert 64 * 64 * 3 < r['bytes_sent'] < 64 * 64 * 3 * 2
        # unknown (NaN) until the bandwidth monitor's first report; the wait saw it known
        assert math.isnan(r['bandwidth_mbps']) or (r['bandwidth_mbps'] > 0 and r['rtt_ms'] > 0)
    assert done[-1]['bandwidth_mbps'] > 0 and done[-1]['rtt_ms'] > 0
    for r in records:
        if r['result'] != 'offloaded':
            assert r['reason'], r
    listener.wait_for(lambda: all(outputs.values()), 10, 'every output topic', logs)
    for name, shape in OUTPUTS.items():
        msg = outputs[name][-1]
        assert [d.size for d in msg.layout.dim] == shape
        assert [d.label for d in msg.layout.dim] == LABELS[len(shape)]
        assert msg.layout.dim[0].stride == len(msg.data) == int(np.prod(shape))
    # the node knew the link from the monitor's report; this listener, which subscribed
    # after the nodes started, may get that report later (failed once, loaded 2-core VM)
    listener.wait_for(lambda: _records(bandwidth), 10, 'a /rrto/bandwidth report', logs)
    link = _records(bandwidth)[-1]
    assert link['health'] == 'ok' and float(link['rtt_ms']) > 0
    listener.wait_for(lambda: any(
        s.name == 'offload_node: keypoint_net' and s.level == m.OK
        for a in diagnostics for s in a.status), 10, 'offload_node diagnostics', logs)
    listener.wait_for(lambda: any(s.hardware_id == server.endpoint and 'link' in s.name
                                  for a in diagnostics for s in a.status),
                      10, 'link health on /diagnostics', logs)
    for proc in (camera, offload, monitor):
        assert proc.stop() == 0, proc.output()


class _Camera:
    """The test as the camera: one frame at a time, waiting for its record and outputs."""

    def __init__(self, listener, topic='/test/image'):
        self.listener = listener
        self.pub = listener.node.create_publisher(Image, topic, m.IMAGE_QOS)
        self.latency = listener.subscribe(DiagnosticStatus, '/rrto/latency', m.LATENCY_QOS)
        self.heatmaps = listener.subscribe(Float32MultiArray, '/offload_node/output/heatmaps',
                                           m.OUTPUT_QOS)
        self.model = WithImageInput(keypoint_net()).eval()
        self.sec = 1000
        self.rng = np.random.default_rng(0)

    def send(self, logs, encoding='rgb8', pixels=None):
        """Publish one frame; return its record, and check its output against local."""
        if pixels is None:
            pixels = self.rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        fields = array_to_image(pixels, encoding, padding=4)
        msg = Image(**fields)
        self.sec += 1
        msg.header.stamp.sec = self.sec
        stamp = f'{self.sec}.000000000'
        seen = len(self.heatmaps)
        record = None
        for _ in range(3):   # best effort: publish again if the frame was not taken
            self.pub.publish(msg)
            try:
                record = self.listener.wait_for(
                    lambda: next((r for r in _records(self.latency) if r['stamp'] == stamp),
                                 None), 15, f'the record of frame {stamp}', logs)
                break
            except AssertionError:
                continue
        assert record is not None, logs()
        self.listener.wait_for(lambda: len(self.heatmaps) > seen, 10, 'its output', logs)
        frame = ImageConverter('rgb')(**{k: fields[k] for k in (
            'height', 'width', 'encoding', 'step', 'data', 'is_bigendian')})
        with torch.inference_mode():
            expected = self.model(frame)['heatmaps']
        got = torch.tensor(np.asarray(self.heatmaps[-1].data, np.float32)).view(expected.shape)
        assert_same_as_local(got, expected)
        return record


def test_server_killed_shows_fallback_and_recovers_with_outputs_equal_to_local(
        server_process, ros_nodes, listener, tmp_path):
    server = server_process(tmp_path / 'store', None, '--device', 'cpu')  # compared at 1e-5
    offload = ros_nodes('offload_node', server=server.endpoint, model=MODEL,
                        input_topic='/test/image', resize_height=0, resize_width=0,
                        timeout_ms=1500.0, connect_timeout_ms=300.0)
    # 'ok' here means probes are answered; rtt/uplink thresholds judge a real link, not a
    # loaded machine's loopback (they are tested in test_bandwidth)
    monitor = ros_nodes('bandwidth_monitor', server=server.endpoint, probe_rate_hz=5.0,
                        probe_timeout_ms=300.0, down_after=2, rtt_warn_ms=300.0,
                        min_uplink_mbps=0.0)
    logs = _logs(offload, monitor)
    camera = _Camera(listener)
    bandwidth = listener.subscribe(DiagnosticStatus, '/rrto/bandwidth', m.STATUS_QOS)
    diagnostics = listener.subscribe(DiagnosticArray, '/diagnostics', m.DIAGNOSTICS_QOS)

    def until(result, limit_s=120):
        # frames until the node reports ``result``; bounded in time, not in frames: how many
        # frames recovery takes (reconnect, re-record) depends on how loaded the machine is
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            record = camera.send(logs)
            if record['result'] == result:
                return record
        raise AssertionError(f'no {result} record in {limit_s} s\n{logs()}')

    assert until('offloaded')['fallback'] is False
    # an encoding it cannot read is rejected with a logged error; the node keeps going
    bad = Image(height=2, width=2, encoding='yuv422', step=4, data=bytes(8))
    camera.pub.publish(bad)
    listener.wait_for(lambda: any(kv.key == 'frames_rejected' and kv.value == '1'
                                  for a in diagnostics for s in a.status for kv in s.values),
                      10, 'the rejected frame counted on /diagnostics', logs)

    server.kill()
    record = until('local_fallback')
    assert record['fallback'] is True and record['reason'] and record['round_trips'] == 0
    listener.wait_for(lambda: _records(bandwidth) and _records(bandwidth)[-1]['health'] == 'down',
                      20, 'the link reported down', logs)

    server.start()   # same port and store
    record = until('offloaded')
    assert record['round_trips'] == 1 and record['fallback'] is False
    listener.wait_for(lambda: _records(bandwidth)[-1]['health'] == 'ok', 20,
                      'the link reported ok again', logs)
    assert 'yuv422' in offload.output()
    for proc in (offload, monitor):
        assert proc.stop() == 0, proc.output()


# what a node must never print while it stops, however it is stopped
UNCLEAN = ('Traceback', 'terminate called', 'was never retrieved', 'KeyboardInterrupt')


def _send(procs, how: str) -> None:
    group = procs[0].proc.pid   # every node joined the first one's process group
    if how == 'sigterm':
        for proc in procs:
            proc.proc.send_signal(signal.SIGTERM)
    elif how == 'sigint':
        for proc in procs:
            proc.proc.send_signal(signal.SIGINT)
    else:   # a terminal's Ctrl-C reaches the whole group, then launch forwards another
        os.killpg(group, signal.SIGINT)
        time.sleep(0.05)
        os.killpg(group, signal.SIGINT)


@pytest.mark.parametrize('how', ['sigint', 'double_sigint_to_the_group', 'sigterm'])
def test_every_node_exits_0_without_a_traceback_however_it_is_stopped(
        ros_nodes, listener, tmp_path, how):
    from rrto_testing import free_port
    endpoint = f'tcp://127.0.0.1:{free_port()}'
    server = ros_nodes('server_node', start=False, bind=endpoint, device='cpu',
                       store=str(tmp_path / 'store')).start(process_group=0)
    group = server.proc.pid
    camera = ros_nodes('camera_sim', start=False, width=64, height=64,
                       rate_hz=10.0).start(group)
    offload = ros_nodes('offload_node', start=False, server=endpoint, model=MODEL,
                        resize_height=64, resize_width=64, timeout_ms=3000.0).start(group)
    monitor = ros_nodes('bandwidth_monitor', start=False, server=endpoint,
                        probe_rate_hz=10.0).start(group)
    procs = [server, camera, offload, monitor]
    latency = listener.subscribe(DiagnosticStatus, '/rrto/latency', m.LATENCY_QOS)
    listener.wait_for(lambda: any(r['result'] == 'offloaded' for r in _records(latency)),
                      300, 'an offloaded inference', _logs(*procs))
    _send(procs, how)   # while inferences, probes and diagnostics are in flight
    for proc in procs:
        assert proc.wait(30) == 0, proc.output()
        assert not any(word in proc.output() for word in UNCLEAN), proc.output()


@pytest.mark.parametrize('entry', ['offload_node', 'server_node', 'bandwidth_monitor',
                                   'camera_sim'])
def test_a_node_stopped_while_it_still_imports_exits_0_quietly(domain_id, tmp_path, entry):
    from ros_testing import ros_env
    # what ros2 run / ros2 launch start: the console entry point (setup.py)
    code = f'import sys; from rrto_ros.nodes.entry import {entry}; sys.exit({entry}())'
    log = tmp_path / 'out.log'
    with open(log, 'wb') as out:
        proc = subprocess.Popen([sys.executable, '-c', code], env=ros_env(domain_id),
                                stdout=out, stderr=subprocess.STDOUT)
    time.sleep(0.3)   # the entry point is in place, the node's imports are not done
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)   # and the terminal's second Ctrl-C
    assert proc.wait(120) == 0, log.read_text()
    assert not any(word in log.read_text() for word in UNCLEAN), log.read_text()


@pytest.mark.parametrize('module, params, name', [
    ('offload_node', {'timeout_ms': -5.0}, 'timeout_ms'),
    ('offload_node', {'model': 'python:rrto_ros.zoo:no_such_model'}, 'model'),   # configure
    ('offload_node', {'resize_width': 0}, 'resize_width'),                       # configure
    ('bandwidth_monitor', {'server': 'gpu-host:5555'}, 'server'),
    ('camera_sim', {'encoding': 'yuv422'}, 'encoding'),
    ('server_node', {'device': 'tpu'}, 'device'),
    ('server_node', {'task_late': 'slam'}, 'task_late'),
])
def test_invalid_parameters_fail_at_start_naming_the_parameter_and_the_real_node(
        ros_nodes, module, params, name):
    # the FATAL line carries the node's real name, after -r __node:=...
    proc = ros_nodes(module, ros_args=('-r', '__node:=renamed'), **params)
    assert proc.wait(120) == 2
    out = proc.output()
    assert f"parameter '{name}'" in out and 'Traceback' not in out, out
    assert '[FATAL]' in out and '[renamed]' in out and f'[{module}]' not in out, out


def test_bringup_composes_the_nodes_and_prints_the_summary(tmp_path, domain_id):
    from launch_testing_helpers import REPO
    from ros_testing import ros_env
    from rrto_testing import free_port
    config = yaml.safe_load((REPO / 'config' / 'offload.yaml').read_text())
    config['offload_node']['ros__parameters'].update(
        model=MODEL, resize_height=64, resize_width=64, timeout_ms=3000.0)
    config['camera_sim']['ros__parameters'].update(width=96, height=72, rate_hz=8.0)
    path = tmp_path / 'offload.yaml'
    path.write_text(yaml.safe_dump(config))
    run = subprocess.run(
        [sys.executable, '-m', 'rrto_ros.bringup', '--config', str(path), '--duration', '40',
         '--summary-period', '1.0', '--server', f'tcp://127.0.0.1:{free_port()}'],
        env=ros_env(domain_id), capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert 'keypoint_net' in out and ' offloaded, ' in out, out
    for line in ('calls ', 'round trips ', 'latency ms (/rrto/latency total): p50',
                 'offloaded call ms (median)'):
        assert line in run.stdout, out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_offload_node_on_a_cuda_server_in_fp16(server_process, ros_nodes, listener, tmp_path):
    server = server_process(tmp_path / 'store', None, '--device', 'cuda')
    offload = ros_nodes('offload_node', server=server.endpoint, input_topic='/cam/image',
                        precision='fp16', timeout_ms=500.0)
    camera = ros_nodes('camera_sim', topic='/cam/image', rate_hz=15.0)
    latency = listener.subscribe(DiagnosticStatus, '/rrto/latency', m.LATENCY_QOS)
    done = listener.wait_for(
        lambda: [r for r in _records(latency) if r['result'] == 'offloaded'][10:],
        180, 'offloaded ResNet-18 inferences on the GPU', _logs(camera, offload))
    assert all(r['round_trips'] == 1 and r['task'] == 'resnet18' for r in done)
    assert 224 * 224 * 3 < done[-1]['bytes_sent'] < 224 * 224 * 3 * 2
