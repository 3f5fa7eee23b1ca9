"""
The tree's shape: no import cycle, no oversized module, no reach into another module's privates.

These are the architecture's rules (docs/architecture.md) checked from the
source with :mod:`ast`, so they hold for code paths no other test imports.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ('rrto_wire', 'rrto_server', 'rrto_ros')
MAX_LINES = 400
# modules allowed over MAX_LINES, each with its reason
LONG_MODULES: dict[str, str] = {}
# private names of other libraries that tests/tools must use; ``obj._name`` only
ALLOWED_PRIVATE = {
    '_schema',   # torch OpOverload._schema: torch has no public way to read an operator's schema
    '_dynamo',   # torch._dynamo.explain, config.patch: no torch.compiler equivalent (2.13)
}


def _modules() -> dict[str, Path]:
    """Return every module of the packages by dotted name (a package is its __init__)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob('*.py')):
            parts = list(path.relative_to(ROOT).with_suffix('').parts)
            if parts[-1] == '__init__':
                parts.pop()
            found['.'.join(parts)] = path
    return found


def _resolve(name: str, modules: dict) -> str | None:
    """Return the module ``name`` refers to: itself, or the package that defines it."""
    while name and name not in modules:
        name = name.rpartition('.')[0]
    return name or None


def _imports(module: str, path: Path, modules: dict) -> set[str]:
    """Return the in-tree modules ``module`` imports anywhere (function-local ones too)."""
    package = module if path.name == '__init__.py' else module.rpartition('.')[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')
                anchor = anchor[:len(anchor) - node.level + 1]
                base = '.'.join(anchor + ([base] if base else []))
            # ``from pkg import name``: the submodule pkg.name if there is one, else pkg
            names = [f'{base}.{alias.name}' for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                targets.add(target)
    return targets


def import_graph() -> dict[str, set[str]]:
    """Return module -> the in-tree modules it imports."""
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Return the strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_is_acyclic():
    graph = import_graph()
    assert 'rrto_wire.protocol' in graph['rrto_wire.hello']       # the scan sees imports
    assert cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
    assert cycles({'a': {'b'}, 'b': set()}) == []


def test_layers_hold():
    """The wire package imports neither side; the server never imports the robot or ROS."""
    graph = import_graph()
    for module, targets in graph.items():
        if module.startswith('rrto_wire'):
            assert all(t.startswith('rrto_wire') for t in targets), (module, targets)
        if module.startswith('rrto_server'):
            assert not any(t.startswith('rrto_ros') for t in targets), (module, targets)


def test_no_module_outside_bench_is_over_the_line_limit():
    too_long = {}
    for path in sorted(_modules().values()):
        lines = len(path.read_text().splitlines())
        name = str(path.relative_to(ROOT))
        if lines > MAX_LINES and name not in LONG_MODULES:
            too_long[name] = lines
    assert too_long == {}


def _tools_and_tests() -> list[Path]:
    """Return the tests, the benchmarks and the command-line tools."""
    tools = [p for p in ROOT.glob('rrto_*/**/*.py')
             if re.search(r'_cli\.py$|__main__\.py$', p.name)]
    return sorted(list(ROOT.glob('test/*.py')) + list(ROOT.glob('bench/*.py')) + tools)


def private_accesses(source: str) -> list[str]:
    """Return ``obj._name`` expressions where obj is not ``self``/``cls`` (dunders excepted)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith('_')
                and not node.attr.endswith('__')):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ('self', 'cls'):
            continue
        if node.attr not in ALLOWED_PRIVATE:
            found.append(f'{node.lineno}: {ast.unparse(node)}')
    return found


def test_no_test_or_tool_touches_a_private_attribute():
    touched = {}
    for path in _tools_and_tests():
        hits = private_accesses(path.read_text())
        if hits:
            touched[str(path.relative_to(ROOT))] = hits
    assert touched == {}


@pytest.mark.parametrize('source, expected', [
    ('om._targets', ['1: om._targets']),
    ('self._x + cls._y + a.__class__', []),
    ('mod._helper(1)', ['1: mod._helper']),
])
def test_the_private_scan_sees_what_it_should(source, expected):
    assert private_accesses(source) == expected


def layout_paths(readme: str) -> list[str]:
    """Return the paths of the README's Layout table (``dir/a.py``, ``b.py`` -> dir/b.py)."""
    table = readme.split('## Layout', 1)[1].split('\n## ', 1)[0]
    paths = []
    for line in table.splitlines():
        if not line.startswith('| `'):
            continue
        directory = ''
        for name in re.findall(r'`([^`]+)`', line.split(' | ')[0]):
            if '/' in name.rstrip('/'):
                directory = name.rsplit('/', 1)[0] + '/'
                paths.append(name)
            else:
                paths.append(name if name.endswith('/') else directory + name)
    return paths


def test_the_readme_layout_names_every_module_and_only_paths_that_exist():
    paths = layout_paths((ROOT / 'README.md').read_text())
    assert [p for p in paths if not (ROOT / p).exists()] == []
    listed = set(paths)
    modules = [str(p.relative_to(ROOT)) for p in _modules().values()]
    modules += [str(p.relative_to(ROOT)) for p in ROOT.glob('bench/*.py')
                if p.name != '__init__.py']
    unlisted = [m for m in modules
                if m not in listed and not any(m.startswith(d) for d in listed
                                               if d.endswith('/'))]
    assert unlisted == []


def test_the_layout_parser_expands_short_names():
    readme = '## Layout\n| path | owns |\n|---|---|\n| `a/b.py`, `c.py` | x |\n| `d/` | y |\n'
    assert layout_paths(readme) == ['a/b.py', 'a/c.py', 'd/']


def test_every_bench_module_imports():
    """A bench command that no test runs still imports (a moved name breaks here, not on a GPU)."""
    names = sorted(p.stem for p in (ROOT / 'bench').glob('*.py') if p.stem != '__init__')
    code = ('import importlib, sys\n'
            'for n in sys.argv[1:]:\n    importlib.import_module("bench." + n)')
    done = subprocess.run([sys.executable, '-c', code, *names], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
