"""Nodes in-process (parameters, newest-frame policy, server stats) and their ROS-free parts."""

import math
import time
from pathlib import Path

import numpy as np
import pytest
import rclpy
import torch
import yaml
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import Image

from rrto_ros.records import CallRecord, OffloadResult
from rrto_ros.image import array_to_image
from rrto_ros.latency import KEYS, parse_values, record_values, stamp_text
from rrto_ros.latest import LatestSlot
from rrto_ros.nodes import bandwidth_monitor, camera_sim, offload_node, server_node, spin
from rrto_ros.nodes import messages as m
from rrto_ros.nodes.params import ParameterError, check_endpoint
from rrto_ros.outputs import dimensions, output_names
from rrto_ros.plan_table import program_key
from rrto_wire import treespec

ROOT = Path(__file__).resolve().parents[1]
NODES = {'offload_node': offload_node, 'bandwidth_monitor': bandwidth_monitor,
         'camera_sim': camera_sim, 'server_node': server_node}
KEYPOINT = 'python:rrto_ros.zoo:keypoint_net'


@pytest.fixture
def context(domain_id):
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=domain_id, signal_handler_options=SignalHandlerOptions.NO)
    yield ctx
    ctx.try_shutdown()


@pytest.fixture
def make_node(context):
    nodes = []

    def make(cls, **overrides):
        """Build the node and, as its process would, configure and activate it."""
        node = cls(context=context, parameter_overrides=[
            Parameter(k, value=v) for k, v in overrides.items()])
        nodes.append(node)
        failure = spin.start(node)
        if failure:
            raise ParameterError(failure)
        return node

    yield make
    for node in nodes:
        node.destroy_node()


# ---------------------------------------------------------------------- config and descriptors
@pytest.mark.parametrize('config, names', [('offload.yaml', ['offload_node', 'bandwidth_monitor',
                                                             'camera_sim']),
                                           ('server.yaml', ['server_node'])])
def test_shipped_yaml_mirrors_every_declared_default(config, names):
    doc = yaml.safe_load((ROOT / 'config' / config).read_text())
    assert sorted(doc) == sorted(names)
    for name in names:
        values = doc[name]['ros__parameters']
        defaults = {p.name: p.default for p in NODES[name].PARAMS}
        assert values == defaults, name
        for key, value in values.items():   # ROS types: 200.0 is not 200
            assert type(value) is type(defaults[key]), (name, key)


@pytest.mark.parametrize('module', NODES.values(), ids=NODES)
def test_every_parameter_has_a_descriptor_and_only_runtime_ones_are_writable(module):
    for param in module.PARAMS:
        desc = param.descriptor()
        assert desc.description and desc.name == param.name and desc.type != 0
        assert desc.read_only is (not param.runtime)
        if param.range is not None:
            assert desc.floating_point_range or desc.integer_range
    endpoints = [p for p in module.PARAMS if p.name in ('server', 'bind')]
    assert all(p.descriptor().read_only for p in endpoints)


def test_endpoint_check():
    for good in ['tcp://127.0.0.1:5555', 'tcp://gpu-host:6000', 'tcp://*:5555',
                 'tcp://[::1]:5555', 'ipc:///tmp/rrto']:
        assert check_endpoint(good) is None, good
    for bad in ['127.0.0.1:5555', 'tcp://host', 'tcp://host:99999', 'http://h:1', '']:
        assert check_endpoint(bad), bad


@pytest.mark.parametrize('overrides, name', [
    ({'timeout_ms': -1.0}, 'timeout_ms'),
    ({'codec': 'gzip'}, 'codec'),
    ({'mode': 'fast'}, 'mode'),
    ({'precision': 'int4'}, 'precision'),
    ({'channel_order': 'rgba'}, 'channel_order'),
    ({'server': 'localhost'}, 'server'),
    ({'mean': [0.5]}, 'mean'),
    ({'std': [1.0, 0.0, 1.0]}, 'std'),
    ({'resize_height': 32, 'resize_width': 0}, 'resize_width'),
    ({'model': str(ROOT / 'nope.onnx')}, 'model'),
    ({'priority': 1000}, 'priority'),
    ({'late': 'never'}, 'late'),
    ({'plan_table': str(ROOT / 'no-such-table.json')}, 'plan_table'),
    ({'plan_table': str(ROOT / 'package.xml')}, 'plan_table'),
    ({'switch_after': 0}, 'switch_after'),
])
def test_offload_node_rejects_bad_values_naming_the_parameter(make_node, overrides, name):
    with pytest.raises(ParameterError, match=f"parameter '{name}'"):
        make_node(offload_node.OffloadNode, **overrides)


@pytest.mark.parametrize('node_class, overrides, name', [
    (camera_sim.CameraSim, {'encoding': 'yuv422'}, 'encoding'),
    (camera_sim.CameraSim, {'width': 0}, 'width'),
    (bandwidth_monitor.BandwidthMonitor, {'server': 'gpu-host'}, 'server'),
    (bandwidth_monitor.BandwidthMonitor, {'probe_rate_hz': 0.0}, 'probe_rate_hz'),
])
def test_other_nodes_reject_bad_values_naming_the_parameter(make_node, node_class, overrides,
                                                            name):
    with pytest.raises(ParameterError, match=f"parameter '{name}'"):
        make_node(node_class, **overrides)


def test_timeout_changes_at_run_time_and_read_only_parameters_do_not(make_node):
    node = make_node(offload_node.OffloadNode, model=KEYPOINT)
    assert node.set_parameters([Parameter('timeout_ms', value=75.0)])[0].successful
    assert node.engine.timeout_ms == 75.0 and node.engine.data.call_timeout_ms == 75.0
    bad = node.set_parameters([Parameter('timeout_ms', value=-1.0)])[0]
    assert not bad.successful and 'timeout_ms' in bad.reason
    assert node.engine.timeout_ms == 75.0
    for name, value in [('server', 'tcp://other:5555'), ('mode', 'local')]:
        result = node.set_parameters([Parameter(name, value=value)])[0]
        assert not result.successful and 'read-only' in result.reason


def test_plan_table_changes_at_run_time_and_bad_tables_are_refused(make_node, tmp_path):
    from rrto_ros.plan_table import PlanTable
    node = make_node(offload_node.OffloadNode, model=KEYPOINT)
    assert node.engine.table is None
    table, other = tmp_path / 'plans.json', tmp_path / 'other.json'
    flat, spec = treespec.flatten(((torch.zeros(1, 32, 32, 3, dtype=torch.uint8),), {}))
    artifact = node.engine.local.artifact(flat, spec)
    inputs = [s.to_json() for s in artifact.signature]
    entries = [{'bandwidth_mbps': 5.0, 'rtt_ms': 5.0, 'plan': {'kind': 'local'}}]
    PlanTable(program_key(artifact), 'kp', inputs, entries, {}, {}).save(table)
    assert node.set_parameters([Parameter('plan_table', value=str(table))])[0].successful
    assert node.engine.table is not None and node.engine.table.label == 'kp'
    PlanTable('0' * 64, 'kp', inputs, entries, {}, {}).save(other)   # another program
    bad = node.set_parameters([Parameter('plan_table', value=str(other))])[0]
    assert not bad.successful and 'plan_table' in bad.reason and 'solved for' in bad.reason
    assert node.engine.table.program == program_key(artifact)
    bad = node.set_parameters([Parameter('plan_table', value=str(tmp_path / 'missing.json'))])[0]
    assert not bad.successful and 'plan_table' in bad.reason and 'missing.json' in bad.reason
    assert node.engine.table is not None
    assert node.set_parameters([Parameter('plan_table', value='')])[0].successful
    assert node.engine.table is None


# ---------------------------------------------------------------------- newest frame only
def _image(sec: int) -> Image:
    msg = Image(**array_to_image(np.zeros((64, 64, 3), np.uint8), 'rgb8'))
    msg.header.stamp.sec = sec
    return msg


def test_frames_arriving_during_an_inference_keep_only_the_newest(make_node, context):
    node = make_node(offload_node.OffloadNode, model=KEYPOINT, mode='local', autostart=False,
                     resize_height=0, resize_width=0, input_topic='/units/image')
    seen = []
    sub_node = rclpy.create_node('units_listener', context=context)
    sub_node.create_subscription(m.DiagnosticStatus, '/rrto/latency',
                                 lambda msg: seen.append(parse_values(m.values_of(msg))),
                                 m.LATENCY_QOS)
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    for sec in range(1, 6):          # five frames while nothing runs: four are replaced
        node.on_image(_image(sec))
    assert node.slot.dropped == 4 and node.slot.received == 5
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(sub_node)
    deadline = time.monotonic() + 30
    while not seen and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.05)
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        executor.spin_once(timeout_sec=0.05)
    executor.shutdown(timeout_sec=1)
    sub_node.destroy_node()
    assert [r['stamp'] for r in seen] == [stamp_text(5, 0)], 'only the newest frame ran'
    assert seen[0]['frames_dropped'] == 4 and seen[0]['result'] == 'local'


def test_latest_slot_is_bounded_and_counts_replacements():
    slot = LatestSlot()
    assert slot.take() == (False, None) and not slot
    assert slot.put(1) is False and slot.put(2) is True and slot.put(3) is True
    assert slot and slot.take() == (True, 3) and slot.take() == (False, None)
    assert (slot.received, slot.dropped) == (3, 2)


# ---------------------------------------------------------------------- server_node
def test_server_node_serves_and_publishes_its_counters(make_node, context, tmp_path):
    from rrto_testing import free_port, hello
    endpoint = f'tcp://127.0.0.1:{free_port()}'
    node = make_node(server_node.ServerNode, bind=endpoint, store=str(tmp_path / 'store'),
                     device='cpu', diagnostics_period_s=0.2, sched_policy='fifo',
                     late_policy='run', cpu_workers=3)
    assert hello(endpoint)['kind'] == 'ok'
    config = node.server.config
    assert (config.sched_policy, config.late_policy, config.cpu_workers, config.pack_theta) == (
        'fifo', 'run', 3, None)
    got = []
    sub = rclpy.create_node('units_diag', context=context)
    sub.create_subscription(DiagnosticArray, '/diagnostics', got.append, m.DIAGNOSTICS_QOS)
    executor = MultiThreadedExecutor(num_threads=2, context=context)
    executor.add_node(node)
    executor.add_node(sub)
    deadline = time.monotonic() + 20
    while not got and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.1)
    executor.shutdown(timeout_sec=1)
    sub.destroy_node()
    (status,) = got[-1].status
    values = dict(m.values_of(status))
    assert status.name == 'server_node: rrto_server' and status.hardware_id == endpoint
    assert int(values['requests/hello']) >= 1 and values['device'] == 'cpu'
    assert 'scheduler/pending' in values and 'bytes_in' in values


def test_server_node_names_a_busy_endpoint(make_node, server):
    with pytest.raises(ParameterError, match="parameter 'bind'"):
        make_node(server_node.ServerNode, bind=server.endpoint, device='cpu')


# ---------------------------------------------------------------------- ROS-free parts
def test_output_names_follow_the_output_structure():
    def names(obj):
        return output_names(treespec.flatten(obj)[1])

    x = torch.zeros(1)
    assert names(x) == ['output']
    assert names((x, x)) == ['output0', 'output1']
    expected = ['boxes', 'class_scores', 'output_3d']
    assert names({'boxes': x, 'class-scores': x, '3d': x}) == expected
    assert names({'head': (x, {'a b': x})}) == ['head/output0', 'head/output1/a_b']
    assert names({'a': x, 'a!': x}) == ['a', 'a_2']


def test_dimensions_are_labelled_with_strides():
    assert dimensions((1, 17, 16, 16)) == [('batch', 1, 4352), ('channel', 17, 4352),
                                           ('height', 16, 256), ('width', 16, 16)]
    assert dimensions((2, 10)) == [('batch', 2, 20), ('feature', 10, 10)]
    assert dimensions(()) == [('index', 1, 1)]
    labels = [d[0] for d in dimensions((1, 2, 3, 4, 5))]
    assert labels == ['batch', 'dim1', 'dim2', 'dim3', 'dim4']


def test_latency_values_round_trip_with_types():
    record = CallRecord(OffloadResult.LOCAL_FALLBACK, 'offload', total_ms=12.3456,
                        network_ms=10.0, robot_compute_ms=2.3456, reason='no reply in time')
    pairs = record_values(record, task='detect', server='tcp://h:1', stamp=stamp_text(5, 7),
                          preprocess_ms=0.5, age_ms=20.0, frames_dropped=3)
    assert [k for k, _ in pairs] == list(KEYS)
    values = parse_values(pairs)
    assert values['fallback'] is True and values['result'] == 'local_fallback'
    assert values['total_ms'] == 12.346 and values['stamp'] == '5.000000007'
    assert math.isnan(values['bandwidth_mbps']) and values['frames_dropped'] == 3
    assert values['round_trips'] == 0 and values['task'] == 'detect'
    record.bandwidth_mbps = 42.0
    assert parse_values(record_values(record, task='t', server='s', stamp='0.000000000',
                                      preprocess_ms=0, age_ms=0))['bandwidth_mbps'] == 42.0


def test_readme_documents_every_parameter_and_latency_key():
    readme = (ROOT / 'README.md').read_text()
    for name, module in NODES.items():
        section = readme.split(f'#### `{name}`', 1)[1].split('####', 1)[0]
        for param in module.PARAMS:
            assert f'`{param.name}`' in section, (name, param.name)
    for key in KEYS:
        assert f'`{key}`' in readme, key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_server_node_serves_on_cuda(make_node, tmp_path):
    from rrto_testing import free_port, hello
    endpoint = f'tcp://127.0.0.1:{free_port()}'
    node = make_node(server_node.ServerNode, bind=endpoint, store=str(tmp_path / 'store'),
                     device='cuda')
    assert node.server.device.type == 'cuda'
    assert hello(endpoint)['device'].startswith('cuda')


def test_the_shipped_plan_table_matches_the_model_the_node_builds(make_node):
    table_path = ROOT / 'config' / 'plans' / 'keypoint_net_224.json'
    node = make_node(offload_node.OffloadNode, model='python:rrto_ros.zoo:keypoint_net',
                     plan_table=str(table_path))
    frame = torch.zeros(1, 224, 224, 3, dtype=torch.uint8)
    flat, spec = treespec.flatten(((frame,), {}))
    # the table names the exact program the node uploads, so the engine will use its plans
    assert program_key(node.engine.local.artifact(flat, spec)) == node.engine.table.program
    assert {p.kind for p in node.engine.table.plans()} >= {'local', 'hybrid'}


# ---------------------------------------------------------------------- what a record says
def _keypoint_artifact():
    from rrto_ros.local_model import TorchModule
    from rrto_ros.preprocess import WithImageInput
    from rrto_ros.zoo import keypoint_net
    model = WithImageInput(keypoint_net()).eval()
    x = torch.randint(0, 256, (1, 64, 48, 3), dtype=torch.uint8)
    return model, x, TorchModule(model).artifact(*treespec.flatten(((x,), {})))


def test_a_late_reply_reports_the_request_it_sent_and_its_attempt(server, offloaded):
    model, x, _ = _keypoint_artifact()
    om = offloaded(model, server.endpoint, timeout_ms=30000)
    assert om.warmup(x)
    om(x)
    sent = om.last.bytes_sent
    assert om.last.result == OffloadResult.OFFLOADED and sent > x.numel()
    om.set_timeout(0.01)   # no reply can come in 10 us: this call times out
    om(x)
    record = om.last
    assert record.result == OffloadResult.LOCAL_FALLBACK and 'no reply' in record.reason
    assert (record.round_trips, record.bytes_sent, record.bytes_received) == (1, sent, 0)


def test_a_hybrid_record_times_the_network_from_its_timestamps(server, offloaded):
    from rrto_ros.graph import GraphAnalysis
    from rrto_ros.plan_table import PlanTable
    from rrto_ros.split import Plan, as_program
    from rrto_wire.weights import unpack_weights
    model, x, artifact = _keypoint_artifact()
    program = as_program(artifact.program)
    blob = [d for kind, d in artifact.blobs.values() if kind == 'weights'][0]
    weights = unpack_weights(bytearray(blob))
    analysis = GraphAnalysis(program, {k: v.shape for k, v in weights.items()})
    plan = Plan('hybrid', analysis.cut_candidates()[-1], 0.5)
    table = PlanTable(program_key(artifact), 'kp', [s.to_json() for s in artifact.signature],
                      [{'bandwidth_mbps': 5, 'rtt_ms': 5, 'plan': plan.to_json()}], {}, {})
    om = offloaded(model, server.endpoint, timeout_ms=30000, plan_table=table, link=(5, 5),
                   plan_feedback=False)   # keep the hybrid plan even where it measures slow
    assert om.warmup(x)
    for _ in range(3):
        om(x)
        record = om.last
        assert record.plan == plan.name and record.result == OffloadResult.OFFLOADED
        # request sent -> reply taken, less the server's time: never the clamped 0 of old
        assert 0 < record.network_ms < record.total_ms
        assert record.round_trips == 1 and record.bytes_sent > 0 and record.robot_compute_ms > 0


def test_diagnostics_publish_every_task_and_a_failing_one_as_error(context):
    from rclpy.lifecycle import LifecycleNode
    from rrto_ros.nodes.diagnostics import Diagnostics, Health
    node = LifecycleNode('diag_units', context=context)
    diagnostics = Diagnostics(node, 10.0)
    diagnostics.add('fine', lambda: Health(m.OK, 'ok', [('n', 1)], 'hw'))
    diagnostics.add('broken', lambda: 1 / 0)
    got = []
    sub = rclpy.create_node('diag_listener', context=context)
    sub.create_subscription(DiagnosticArray, '/diagnostics', got.append, m.DIAGNOSTICS_QOS)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(sub)
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        diagnostics.force_update()   # inactive: the lifecycle publisher sends nothing
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline:
            diagnostics.force_update()
            executor.spin_once(timeout_sec=0.2)
    finally:
        executor.shutdown(timeout_sec=1)
        diagnostics.destroy()
        sub.destroy_node()
        node.destroy_node()
    fine, broken = got[0].status
    assert (fine.name, fine.level, fine.hardware_id) == ('diag_units: fine', m.OK, 'hw')
    assert dict(m.values_of(fine)) == {'n': '1'}
    assert broken.level == m.ERROR and 'ZeroDivisionError' in broken.message


def test_offload_node_names_an_unreadable_curve_key(make_node, tmp_path):
    with pytest.raises(ParameterError, match="parameter 'server_key': .*nope.key"):
        make_node(offload_node.OffloadNode, model=KEYPOINT, server_key=str(tmp_path / 'nope.key'),
                  client_key=str(tmp_path / 'me.key_secret'))


# ---------------------------------------------------------------------- defaults under load
def test_fallback_skip_computes_nothing_while_the_server_cannot_serve(offloaded):
    from rrto_testing import free_port
    x = torch.zeros(1, 3, 8, 8)
    net = torch.nn.Conv2d(3, 2, 3)
    om = offloaded(net, f'tcp://127.0.0.1:{free_port()}', timeout_ms=100, fallback='skip',
                   connect_timeout_ms=100)
    om.local.run = None   # any local computation fails the test
    assert om(x) is None
    record = om.last
    assert record.result == OffloadResult.SKIPPED and record.fallback
    assert record.robot_compute_ms == 0 and record.reason
    assert om.stats()['skipped'] == 1 and om.stats()['local'] == om.stats()['fallbacks'] == 0
    with pytest.raises(ValueError, match='fallback'):
        offloaded(net, 'tcp://127.0.0.1:1', fallback='never')


def test_fallback_skip_still_runs_what_only_the_robot_can_run(offloaded):
    x = torch.zeros(1, 3, 8, 8)
    net = torch.nn.Conv2d(3, 2, 3)
    om = offloaded(net, 'tcp://127.0.0.1:1', mode='local', fallback='skip')
    torch.testing.assert_close(om(x), net(x))
    assert om.last.result == OffloadResult.LOCAL


def test_the_auto_timeout_follows_the_server_and_a_late_reply_doubles_it(offloaded):
    from rrto_ros import engine
    om = offloaded(torch.nn.Conv2d(3, 2, 3), 'tcp://127.0.0.1:1', timeout_ms='auto')
    assert om.timeout_ms == engine.AUTO_FLOOR_MS
    late = CallRecord(OffloadResult.SKIPPED, 'offload')
    om.follow_server(late, timed_out=True)
    assert om.timeout_ms == 2 * engine.AUTO_FLOOR_MS == om.data.call_timeout_ms
    for _ in range(5):
        om.follow_server(late, timed_out=True)
    assert om.timeout_ms == engine.AUTO_CEILING_MS
    fast = CallRecord(OffloadResult.OFFLOADED, 'offload', server_ms=90.0, network_ms=10.0)
    for _ in range(60):
        om.follow_server(fast, timed_out=False)
    assert om.timeout_ms == pytest.approx(engine.AUTO_FACTOR * 100.0, rel=0.01)
    om.set_timeout(500.0)   # a fixed budget does not move
    om(torch.zeros(1, 3, 8, 8))
    assert om.timeout_ms == 500.0


def _keyring(tmp_path):
    from rrto_server import keys
    server_dir, robots = tmp_path / 'server', tmp_path / 'robots'
    assert keys.main(['server', str(server_dir)]) == 0
    assert keys.main(['client', str(robots), 'robot']) == 0
    assert keys.main(['allow', str(server_dir), str(robots / 'robot.key')]) == 0
    return server_dir, robots


def _link_messages(context, node, until, timeout_s=60.0):
    from diagnostic_msgs.msg import DiagnosticStatus
    got = []
    sub = rclpy.create_node('link_listener', context=context)
    sub.create_subscription(DiagnosticStatus, m.BANDWIDTH_TOPIC, got.append, m.STATUS_QOS)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(sub)
    deadline = time.monotonic() + timeout_s
    try:
        while not any(until(msg) for msg in got) and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.2)
    finally:
        executor.shutdown(timeout_sec=1)
        sub.destroy_node()
    return got


def test_bandwidth_monitor_probes_a_curve_server_with_its_keys(make_node, make_server, context,
                                                               tmp_path):
    server_dir, robots = _keyring(tmp_path)
    server = make_server(keys=str(server_dir))
    node = make_node(bandwidth_monitor.BandwidthMonitor, server=server.endpoint,
                     server_key=str(server_dir / 'server.key'),
                     client_key=str(robots / 'robot.key_secret'), probe_rate_hz=10.0)
    got = _link_messages(context, node, lambda msg: msg.message.startswith('ok'))
    assert any(msg.message.startswith('ok') for msg in got), [g.message for g in got[-3:]]
    secrets = [line.split('"')[1] for path in (robots / 'robot.key_secret',
                                               server_dir / 'server.key_secret')
               for line in path.read_text().splitlines() if 'secret-key' in line]
    assert secrets and not any(s in str(msg) for msg in got for s in secrets)


def test_bandwidth_monitor_without_keys_says_why_a_curve_server_is_down(make_node, make_server,
                                                                        context, tmp_path):
    server_dir, _ = _keyring(tmp_path)
    server = make_server(keys=str(server_dir))
    node = make_node(bandwidth_monitor.BandwidthMonitor, server=server.endpoint,
                     probe_rate_hz=10.0, probe_timeout_ms=200.0)
    got = _link_messages(context, node, lambda msg: msg.message.startswith('down'))
    down = [msg.message for msg in got if msg.message.startswith('down')]
    assert down and 'no server_key/client_key given' in down[-1], [g.message for g in got[-3:]]


def test_bandwidth_monitor_names_an_unreadable_curve_key(make_node, tmp_path):
    with pytest.raises(ParameterError, match="parameter 'server_key': .*package.xml"):
        make_node(bandwidth_monitor.BandwidthMonitor, server_key=str(ROOT / 'package.xml'),
                  client_key=str(tmp_path / 'me.key_secret'))
    with pytest.raises(ParameterError, match="parameter 'server_key': "):
        make_node(bandwidth_monitor.BandwidthMonitor, client_key=str(tmp_path / 'me.key_secret'))
