"""PLACEHOLDER serial executor (replaced by the ray branch at merge)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WorkItem:
    key: str
    cost: float
    payload: Any


def execute(items, task, shared, results_dir, *, ray_address=None, retries=2, progress=True, desc="measure"):
    import json
    out = {}
    for it in sorted(items, key=lambda i: -i.cost):
        f = None if results_dir is None else results_dir / f"{it.key}.json"
        if f is not None and f.is_file():
            out[it.key] = json.loads(f.read_text())
            continue
        out[it.key] = task(it.payload, shared)
        if f is not None:
            f.write_text(json.dumps(out[it.key]))
    return {it.key: out[it.key] for it in items}
