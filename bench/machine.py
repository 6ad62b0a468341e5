"""The machine a benchmark ran on, printed by every script in ``bench/`` before and after its table.

A ratio measured in one run compares two loops under the same conditions, but absolute seconds
mean little without the cores, the torch threads and what else was running (the load average).
"""
from __future__ import annotations

import os
import platform

import torch


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, or ``unknown`` where the OS has none."""
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def machine_facts() -> str:
    """One line: CPU cores (and those this process may use), torch threads and version, the
    accelerator, and the load average now."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
    return (f"machine: {os.cpu_count()} CPU cores ({usable} usable), torch "
            f"{torch.__version__} with {torch.get_num_threads()} threads, {gpu}, "
            f"{platform.python_implementation()} {platform.python_version()}, "
            f"load average {load_average()} (1/5/15 min)")


def print_machine(stage: str = "start") -> None:
    """Print ``machine_facts()`` (at the start) or only the load average (at the end)."""
    if stage == "start":
        print(machine_facts(), flush=True)
    else:
        print(f"load average at the end: {load_average()} (1/5/15 min)", flush=True)
