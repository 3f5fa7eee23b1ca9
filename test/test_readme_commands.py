"""
Every shell command the README shows works as written (issue: ``rrto-plan`` was "not found").

Each command of the README's ``bash`` blocks must match one entry of
:data:`HOW`: run in its ``--help`` form (it exists, and its help names every
flag the README passes), ``make -n`` (the target exists), or skipped because
it needs a ROS 2 install, a GPU, or the network.  A new README command
without an entry fails the test: classify it.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_ROS = 'needs a ROS 2 install (ros2, colcon, rosdep or its workspace)'
# command prefix -> 'help' | 'make' | a reason to skip (ROS install, GPU, network only)
HOW = {
    'make demo': 'make', 'make test': 'make', 'make bench': 'make',
    'python -m rrto_server': 'help',
    'python -m rrto_ros.plan_cli': 'help',
    'python -m rrto_ros.bringup': 'help',
    'python -m bench.run_all': 'help',
    'python -m bench.report': 'help',
    'python -m bench.linkemu': 'help',
    'python -m rrto_fleet': 'help',
    'ros2 ': SKIP_ROS, 'colcon ': SKIP_ROS, 'cp install/': SKIP_ROS,
    'cd ~/rrto_ws && rosdep': SKIP_ROS,
    'mkdir -p ~/rrto_ws/src': 'needs the network (git clone) and a ROS 2 workspace',
    'pip install ': 'needs the network (PyPI)',
}


def readme_commands() -> list[str]:
    """Return the commands of the README's bash blocks, continuations joined, comments cut."""
    text = (ROOT / 'README.md').read_text()
    commands = []
    for block in re.findall(r'```bash\n(.*?)```', text, re.S):
        for line in block.replace('\\\n', ' ').splitlines():
            command = line.split('  #', 1)[0].strip()
            if command and not command.startswith('#'):
                commands.append(re.sub(r'\s+', ' ', command))
    return commands


def how(command: str) -> str:
    """Return how ``command`` is checked; fail if the README grew an unclassified one."""
    matches = [mode for prefix, mode in HOW.items() if command.startswith(prefix)]
    assert len(matches) == 1, f'classify this README command in HOW: {command!r}'
    return matches[0]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    from rrto_testing import child_env
    return subprocess.run(argv, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=120)


def test_the_readme_shows_commands_and_each_is_classified():
    commands = readme_commands()
    assert len(commands) > 15
    modes = [how(c) for c in commands]
    assert modes.count('help') >= 8 and 'make' in modes


@pytest.mark.parametrize('command', [c for c in readme_commands() if how(c) == 'help'])
def test_a_python_command_exists_and_takes_every_flag_the_readme_passes(command):
    argv = shlex.split(command)
    assert argv[0] == 'python'
    run = _run([sys.executable, *argv[1:3], '--help'])
    assert run.returncode == 0, run.stdout + run.stderr
    own, _, passed_on = ' '.join(argv[3:]).partition(' -- ')   # after '--': rrto_server's own
    for flag in (a.split('=', 1)[0] for a in own.split() if a.startswith('--')):
        assert re.search(rf'{re.escape(flag)}\b', run.stdout), (flag, run.stdout)
    if passed_on:
        server = _run([sys.executable, '-m', 'rrto_server', '--help'])
        for flag in (a.split('=', 1)[0] for a in passed_on.split() if a.startswith('--')):
            assert re.search(rf'{re.escape(flag)}\b', server.stdout), (flag, server.stdout)


@pytest.mark.parametrize('command', [c for c in readme_commands() if how(c) == 'make'])
def test_a_make_target_exists(command):
    run = _run(['make', '-n', shlex.split(command)[1]])
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize('command', [c for c in readme_commands()
                                     if how(c) not in ('help', 'make')])
def test_commands_that_need_ros_gpu_or_network(command):
    pytest.skip(how(command))
