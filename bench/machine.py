"""Describe the machine a benchmark ran on, so every figure names its machine and date."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys

import torch


def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def describe(command: str) -> dict:
    """Return machine, date and software versions for a result file."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return {
        'machine': f'{gpu + ", " if gpu else ""}{_cpu_model()} ({cores} cores)',
        'date': datetime.date.today().isoformat(),
        'command': command,
        'torch': torch.__version__,
        'python': platform.python_version(),
        'gpu': gpu,
    }


def write_results(path: str, command: str, argv: list[str] | None, rows: list[dict]) -> None:
    """Write ``rows`` with :func:`describe`'s fields; ``command`` gets the arguments given."""
    report = describe(command=' '.join([command] + (sys.argv[1:] if argv is None else argv)))
    report['results'] = rows
    with open(path, 'w') as f:
        json.dump(report, f, indent=2)
