"""One declaration of every server option: the command line, server_node and its YAML agree."""

import dataclasses
import sys
from pathlib import Path

import pytest
import yaml

from rrto_ros.nodes import server_node
from rrto_server import options
from rrto_server.__main__ import parse_args
from rrto_server.options import OPTIONS, ServerConfig

ROOT = Path(__file__).resolve().parents[1]
NODE_PARAMS = {p.name: p for p in server_node.PARAMS}
NODE_ONLY = {'diagnostics_period_s'}   # ROS plumbing, not a server option


def test_every_config_field_is_one_option_and_defaults_agree():
    assert sorted(f.name for f in dataclasses.fields(ServerConfig)) == \
        sorted(o.target for o in OPTIONS if o.target)   # strategy only sets pack_theta
    assert ServerConfig() == options.config_from(options.defaults()) == parse_args([])


def test_server_node_declares_every_option_as_a_parameter_with_its_constraints():
    assert set(NODE_PARAMS) - NODE_ONLY == {o.name for o in OPTIONS}
    for option in OPTIONS:
        param = NODE_PARAMS[option.name]
        assert (param.default, param.description, param.range, param.choices) == \
            (option.default, option.help, option.range, option.choices), option.name
        assert type(param.default) is type(option.default)


def test_shipped_server_yaml_lists_every_default():
    values = yaml.safe_load((ROOT / 'config' / 'server.yaml').read_text())
    values = values['server_node']['ros__parameters']
    assert set(values) == set(NODE_PARAMS)
    for name, value in options.defaults().items():
        assert values[name] == value and type(values[name]) is type(value), name


@pytest.mark.parametrize('name, bad', [
    ('max_replays', 0), ('cpu_workers', 65), ('pack_theta', -0.5), ('pack_theta', 2.5),
    ('device', 'tpu'), ('cpu_backend', 'onnx'), ('sched_policy', 'edf'),
    ('task_late', 'slam'), ('task_late', 'slam=later'), ('max_message_mb', 0.0),
    ('threads', -1), ('inline_max_ms', -1.0),
])
def test_a_bad_value_is_refused_by_the_command_line_and_the_node_alike(name, bad, capsys):
    option = options.BY_NAME[name]
    assert NODE_PARAMS[name].problem(bad), (name, bad)
    with pytest.raises(SystemExit) as exit_info:
        parse_args([options.flag(option), str(bad)])
    assert exit_info.value.code == 2
    assert options.flag(option) in capsys.readouterr().err


def test_command_line_values_become_the_config_the_node_would_build():
    argv = ['--bind', 'tcp://127.0.0.1:6000', '--no-upload', '--max-message-mb', '2',
            '--pack-theta', '0.5', '--profile-util', 'off', '--task-late', 'slam=run',
            '--task-late', 'nav=drop,map=run', '--threads', '3', '--store', '~/s']
    node_values = dict(options.defaults(), bind='tcp://127.0.0.1:6000', allow_upload=False,
                       max_message_mb=2.0, pack_theta=0.5, profile_util='off',
                       task_late='slam=run,nav=drop,map=run', threads=3, store='~/s')
    config = parse_args(argv)
    assert config == options.config_from(node_values)
    assert (config.max_message_bytes, config.profile_util, config.store) == (
        2 << 20, False, str(Path.home() / 's'))
    assert config.task_late == {'slam': 'run', 'nav': 'drop', 'map': 'run'}
    assert parse_args(['--pack-theta', '-1']).pack_theta is None   # -1: auto, as on the node


def test_setup_process_sets_the_gil_switch_interval_and_torch_threads(monkeypatch):
    import torch
    seen = {}
    monkeypatch.setattr(sys, 'setswitchinterval', lambda s: seen.update(switch=s))
    monkeypatch.setattr(torch, 'set_num_threads', lambda n: seen.update(threads=n))
    options.setup_process(ServerConfig(threads=3))
    assert seen == {'switch': options.GIL_SWITCH_S, 'threads': 3}


def test_drain_threads_waits_for_the_server_threads_that_outlive_close():
    import threading
    import time
    before = options.threads_now()
    never = threading.Event()
    lane = threading.Thread(target=time.sleep, args=(0.5,), name='rrto-gpu-lane0', daemon=True)
    other = threading.Thread(target=never.wait, args=(30,), name='zmq-gc', daemon=True)
    lane.start()
    other.start()
    start = time.monotonic()
    options.drain_threads(before, timeout_s=10)
    assert not lane.is_alive() and other.is_alive()   # only the server's rrto-* threads
    assert time.monotonic() - start < 5
    never.set()
