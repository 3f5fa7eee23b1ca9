"""Docstring style as a test: pep257 through ament_pep257, as ros2/examples does."""

from pathlib import Path

import pytest
from ament_pep257.main import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.linter
@pytest.mark.pep257
def test_pep257():
    rc = main(argv=[str(ROOT / 'rrto_ros'), str(ROOT / 'rrto_server'), str(ROOT / 'bench')])
    assert rc == 0, 'Found code style errors / warnings'
