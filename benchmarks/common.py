"""Small helpers shared by the benchmarks: timing, machine notes, results JSON and charts."""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
DEFAULT_OUT = Path("docs/bench")


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """Call ``fn`` once; return its result and the wall-clock seconds it took."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def cpu_seconds() -> float:
    """CPU time of this process and its waited-for children (user + system)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed_cpu(fn: Callable[[], T]) -> tuple[T, float, float]:
    """Like :func:`timed`, plus the CPU seconds spent, forked children included. Garbage is
    collected first (as ``timeit`` does by disabling the collector): otherwise a tool pays
    for a full collection of what earlier tools left (0.15-0.2 s in a process with torch
    and every peer loaded), whichever call happens to set it off."""
    gc.collect()
    cpu = cpu_seconds()
    result, wall = timed(fn)
    return result, wall, cpu_seconds() - cpu


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed distribution versions ("missing" for absent ones)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(packages: Iterable[str] = ()) -> dict[str, Any]:
    """What the numbers depend on: CPUs, OS, Python and library versions."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_count": os.cpu_count(), "usable_cpus": usable, "cpu_model": cpu_model(),
            "platform": platform.platform(), "python": sys.version.split()[0],
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "versions": package_versions(packages)}


def write_results(out_dir: str | Path, name: str, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as ``<out_dir>/<name>.json`` (pretty, stable key order)."""
    path = Path(out_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def merge_results(path: str | Path, part: str, data: Mapping[str, Any]) -> Path:
    """Set ``part`` in the JSON object at ``path`` (created if missing), keeping other parts."""
    path = Path(path)
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged[part] = data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    return path


def bar_chart(path: str | Path, labels: Sequence[str], values: Sequence[float], *, title: str,
              xlabel: str, highlight: Iterable[str] = ()) -> Path:
    """A horizontal bar chart PNG, values annotated, ``highlight`` labels in a second colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    marked = set(highlight)
    colors = ["tab:orange" if label in marked else "tab:blue" for label in labels]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(labels) + 1.4))
    bars = ax.barh(list(labels), list(values), color=colors)
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], padding=3)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.set_xlim(0, max(values, default=1) * 1.18)
    ax.xaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
