"""Independent work items, run one after another here or spread over a Ray cluster, one result file each.

    items = [WorkItem(key="chunk-000", cost=12.0, payload=...), ...]
    results = execute(items, task, shared, results_dir)                      # serial, in this process
    results = execute(items, task, shared, results_dir, ray_address="auto")  # on a running Ray cluster

`task(payload, shared) -> dict` computes one item; `shared` is the big input every item reads (token
windows, reference logits): Ray gets it once (`ray.put`) and every task reads it from the object
store, so tasks must treat it as read-only (its numpy arrays arrive read-only there). A task must be
importable by the workers (a module-level function of an installed module, or anything cloudpickle
can send by value).

Each result is written to `results_dir/<key>.json` as it arrives (atomically, through mixquant.files),
so a run that is interrupted or fails loses only the items in flight: the next run with the same
`results_dir` reads back every item whose file parses and computes the rest (an unreadable file is
computed again, saying so). Results are JSON, never pickle: they may come from other machines.

Failures: an item whose task raises, or whose worker process dies, is retried `retries` times (in
both modes); the other items go on, and once all are done one MixquantError names the failed items
and the first one's error.

Ray is an optional extra (`pip install 'mixquant[ray]'`), imported only when `ray_address` is given:
"local" starts a cluster on this machine (one worker per CPU) and stops it afterwards; "auto" or
"HOST:PORT" connects to a running one (`ray start --head` / `ray start --address=HOST:PORT`) and
only disconnects afterwards. To run several `execute` calls on one connection, open it around them
with `ray_session(address)`: while this process is connected, `execute` uses that connection.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from tqdm import tqdm

from ..errors import MixquantError
from ..files import write_text

__all__ = ["WorkItem", "execute", "ray_session"]

Task = Callable[[Any, Any], dict]
Record = Callable[["WorkItem", Any], None]

_KEY = re.compile(r"[A-Za-z0-9._-]+")
# How long a HOST:PORT may take to accept a TCP connection before it counts as not answering.
_CONNECT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class WorkItem:
    """One independent piece of work."""

    key: str  # unique and file-name safe ([A-Za-z0-9._-]+): the stem of the item's result file
    cost: float  # relative cost (e.g. blocks remaining x tokens): the most costly items are submitted first
    payload: Any  # the task's argument (picklable)


def execute(items: Sequence[WorkItem], task: Task, shared: Any, results_dir: Path | None, *,
            ray_address: str | None = None, retries: int = 2, num_cpus: float = 1, num_gpus: float = 0,
            progress: bool = True, desc: str = "measure") -> dict[str, dict]:
    """{key: task(item.payload, shared)} for every item, in the order of `items` (see the module's doc).

    `results_dir=None` writes and skips nothing. `ray_address=None` runs the items here, one after
    another; otherwise one Ray task per item, each holding `num_cpus` CPUs and `num_gpus` GPUs of
    the cluster."""
    _check_items(items)
    if retries < 0:
        raise MixquantError(f"retries must be at least 0, got {retries}")
    done: dict[str, dict] = {}
    if results_dir is not None:
        results_dir = Path(results_dir).expanduser()
        try:
            results_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MixquantError(f"{results_dir}: cannot create the results folder: {exc.strerror or exc}") from None
        done = _read_results(results_dir, items)
    todo = sorted((item for item in items if item.key not in done), key=lambda item: -item.cost)

    failures: list[tuple[WorkItem, str]] = []
    with tqdm(total=len(items), initial=len(done), desc=desc, unit="item", file=sys.stderr,
              disable=not progress) as bar:

        def record(item: WorkItem, result: Any) -> None:
            text = _result_json(item, result, desc)
            if results_dir is not None:
                write_text(results_dir / f"{item.key}.json", text)
            done[item.key] = json.loads(text)  # what a rerun reads back, exactly
            bar.update()

        if todo and ray_address is None:
            failures = _run_serial(todo, task, shared, retries, record)
        elif todo:
            failures = _run_ray(todo, task, shared, retries, record, address=ray_address,
                                num_cpus=num_cpus, num_gpus=num_gpus, desc=desc)
    if failures:
        item, error = failures[0]
        raise MixquantError(f"{desc}: {len(failures)} of {len(items)} items failed after {retries + 1} attempts "
                            f"each; item {item.key}: {error}")
    return {item.key: done[item.key] for item in items}


def _check_items(items: Sequence[WorkItem]) -> None:
    seen: set[str] = set()
    for item in items:
        if not _KEY.fullmatch(item.key):
            raise MixquantError(f"work item key {item.key!r}: use only letters, digits, '.', '_' and '-'")
        if item.key in seen:
            raise MixquantError(f"work item key {item.key!r} is given twice")
        seen.add(item.key)


def _read_results(results_dir: Path, items: Sequence[WorkItem]) -> dict[str, dict]:
    """The results already in `results_dir`; an unreadable one is left out (computed again), saying so."""
    found: dict[str, dict] = {}
    for item in items:
        path = results_dir / f"{item.key}.json"
        if not path.exists():
            continue
        try:
            result = json.loads(path.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            result = None
        if isinstance(result, dict):
            found[item.key] = result
        else:
            print(f"mixquant: {path}: not a readable result; computing it again", file=sys.stderr)
    return found


def _result_json(item: WorkItem, result: Any, desc: str) -> str:
    if not isinstance(result, dict):
        raise MixquantError(f"{desc}: item {item.key}: the task returned a {type(result).__name__}, not a dict")
    try:
        return json.dumps(result)
    except (TypeError, ValueError) as exc:
        raise MixquantError(f"{desc}: item {item.key}: the task's result is not JSON: {exc}") from None


def _describe(exc: BaseException) -> str:
    """`Type: first line of the message`: one line whatever the exception holds."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _run_serial(todo: list[WorkItem], task: Task, shared: Any, retries: int,
                record: Record) -> list[tuple[WorkItem, str]]:
    failures = []
    for item in todo:
        for _attempt in range(retries + 1):
            try:
                result = task(item.payload, shared)
            except Exception as exc:  # the task's own error: retried, then reported with its item
                error = exc
            else:
                record(item, result)
                break
        else:
            failures.append((item, _describe(error)))
    return failures


# --------------------------------------------------------------------------------------------
# Ray


def _import_ray():
    try:
        import ray
    except ImportError:
        raise MixquantError("Ray is not installed; pip install 'mixquant[ray]'") from None
    return ray


def _check_answers(address: str, name: str | None = None) -> None:
    """Fail in seconds, not minutes, when nothing listens at HOST:PORT (ray.init would retry for long)."""
    name = name or address
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise MixquantError(f"Ray address {name!r}: give local, auto or HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise MixquantError(f"Ray address {name}: nothing answers ({exc.strerror or exc}); "
                            "start a cluster there with `ray start --head`") from None


def _auto_address() -> str:
    """The cluster "auto" means, found as Ray finds it (RAY_ADDRESS, the address the last `ray start` on
    this machine recorded, a running GCS process): a stale record would make ray.init wait for minutes."""
    from ray._private.services import canonicalize_bootstrap_address_or_die  # not public; ray is pinned

    try:
        return canonicalize_bootstrap_address_or_die("auto")
    except ConnectionError as exc:
        raise MixquantError(f"Ray address auto: no running cluster found ({_describe(exc)}); "
                            "start one with `ray start --head` or give HOST:PORT") from None


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def ray_session(address: str, *, num_cpus: int | None = None) -> Iterator[None]:
    """This process connected to Ray for the block: "local" starts a cluster here (with `num_cpus`,
    by default every CPU this process may use) and stops it at the end; "auto" or "HOST:PORT"
    connects to a running cluster and disconnects at the end, leaving it running. If this process
    is connected already, that connection is used and left open."""
    ray = _import_ray()
    if address == "auto":
        found = _auto_address()
        _check_answers(found, f"auto ({found})")
    elif address != "local":
        _check_answers(address)
    if ray.is_initialized():
        yield
        return
    options: dict[str, Any] = {}
    if address == "local":
        options["num_cpus"] = num_cpus or _cpu_count()
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 **options)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
        # Ray sends its token only where RAY_AUTH_MODE=token says so; without it, a token cluster refuses us
        hint = "" if address == "local" else " (a cluster with token authentication needs RAY_AUTH_MODE=token here)"
        raise MixquantError(f"Ray address {address}: cannot start or connect: {_describe(exc)}{hint}") from None
    if sigterm is not None and threading.current_thread() is threading.main_thread():
        # ray.init's own handler ends the process with a stack dump, skipping every cleanup
        signal.signal(signal.SIGTERM, sigterm)
    try:
        yield
    finally:
        ray.shutdown()  # stops a "local" cluster; only disconnects from a running one


def _call(task: Task, payload: Any, shared: Any) -> Any:
    """What a Ray worker runs (Ray resolves the shared object's reference before the call)."""
    return task(payload, shared)


def _run_ray(todo: list[WorkItem], task: Task, shared: Any, retries: int, record: Record, *, address: str,
             num_cpus: float, num_gpus: float, desc: str) -> list[tuple[WorkItem, str]]:
    ray = _import_ray()
    failures = []
    with ray_session(address):
        run = ray.remote(_call)
        # retry_exceptions: the task's own errors too, not only a dead worker (which max_retries covers)
        options = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=retries, retry_exceptions=True)
        task_ref, shared_ref = ray.put(task), ray.put(shared)
        pending = {run.options(name=f"{desc}:{item.key}", **options).remote(task_ref, item.payload, shared_ref): item
                   for item in todo}  # costliest first; Ray's own messages name the item
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    item = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        failures.append((item, _describe(getattr(exc, "cause", None) or exc)))
                    else:
                        record(item, result)
        finally:
            for ref in pending:  # interrupted: leave no work queued on a cluster that outlives us
                ray.cancel(ref)
    return failures
