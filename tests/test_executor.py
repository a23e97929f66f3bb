"""The work-item executor: serial and on Ray give the same results, retry dead workers and failing
tasks, name the item that still fails, and skip items whose result file is already there."""

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from mixquant.errors import MixquantError
from mixquant.runtime.executor import WorkItem, execute, ray_session

SHARED = {"x": np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32), "scale": 0.5}


# Tasks: module-level, so that they pickle; each attempt leaves a file `<key>.<pid>.<random>` in the
# payload's `calls` folder, the only way to count calls made in Ray's worker processes.


def _note_call(payload: dict) -> None:
    Path(payload["calls"], f"{payload['row']}.{os.getpid()}.{uuid.uuid4().hex}").touch()


def measure(payload: dict, shared: dict) -> dict:
    """A small real computation on the shared arrays, keyed by the payload."""
    _note_call(payload)
    row = shared["x"][payload["row"]].astype(np.float64)
    gram = np.outer(row, shared["x"].mean(axis=0))
    return {"row": payload["row"], "norm": float(np.linalg.norm(row) * shared["scale"]),
            "top": np.argsort(-np.abs(row))[:3].tolist(), "trace": float(np.trace(gram)), "nested": {"n": row.size}}


def die_once(payload: dict, shared: dict) -> dict:
    """The worker process dies (no exception, no cleanup) on its first attempt at row 2."""
    marker = Path(payload["calls"], "died")
    if payload["row"] == 2 and not marker.exists():
        marker.touch()
        os._exit(1)
    return measure(payload, shared)


def fail_row_3(payload: dict, shared: dict) -> dict:
    if payload["row"] == 3:
        _note_call(payload)
        raise ValueError(f"bad row {payload['row']}\n(a second line the one-line error leaves out)")
    return measure(payload, shared)


def work(calls: Path, rows: int = 6) -> list[WorkItem]:
    calls.mkdir(exist_ok=True)
    return [WorkItem(key=f"row-{r:02d}", cost=float(r % 4), payload={"row": r, "calls": str(calls)}) for r in range(rows)]


def calls_of(calls: Path) -> list[str]:
    return sorted(p.name.split(".")[0] for p in calls.iterdir() if p.is_file() and p.name != "died")


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster with 2 CPUs for every test here (startup takes seconds); module-scoped,
    so that its processes are gone before the rest of the suite runs."""
    ray = pytest.importorskip("ray")
    # pytest imports this module from tests/ (not on the workers' path): send its functions by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with ray_session("local", num_cpus=2):
        yield ray


@pytest.fixture(params=[None, "local"], ids=["serial", "ray"])
def mode(request):
    """Where execute runs: None (here, serially) or "local" (the session's Ray cluster)."""
    if request.param is not None:
        request.getfixturevalue("ray_cluster")
    return request.param


def test_serial_and_ray_agree(ray_cluster, tmp_path):
    items = work(tmp_path / "serial")
    serial = execute(items, measure, SHARED, None, progress=False)
    assert list(serial) == [item.key for item in items]
    assert serial["row-05"]["norm"] == pytest.approx(np.linalg.norm(SHARED["x"][5]) * 0.5)
    assert {p.split(".")[1] for p in os.listdir(tmp_path / "serial")} == {str(os.getpid())}

    items = work(tmp_path / "ray")
    on_ray = execute(items, measure, SHARED, None, ray_address="local", progress=False)
    assert on_ray == serial and list(on_ray) == list(serial)
    pids = {p.split(".")[1] for p in os.listdir(tmp_path / "ray")}
    assert str(os.getpid()) not in pids  # computed in Ray's worker processes


def test_dead_worker_is_retried(ray_cluster, tmp_path):
    items = work(tmp_path / "calls")
    results = execute(items, die_once, SHARED, tmp_path / "results", ray_address="local", progress=False)
    assert (tmp_path / "calls" / "died").exists()
    assert results == execute(work(tmp_path / "again"), measure, SHARED, None, progress=False)
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [f"{item.key}.json" for item in items]


def test_failing_task_names_its_item(mode, tmp_path):
    items = work(tmp_path / "calls")
    with pytest.raises(MixquantError) as error:
        execute(items, fail_row_3, SHARED, tmp_path / "results", ray_address=mode, retries=1, progress=False)
    message = str(error.value)
    assert message == "measure: 1 of 6 items failed after 2 attempts each; item row-03: ValueError: bad row 3"
    assert calls_of(tmp_path / "calls").count("3") == 2  # the first attempt and one retry
    # every other item finished and was kept: a rerun computes only the failed one
    assert sorted(p.stem for p in (tmp_path / "results").iterdir()) == [i.key for i in items if i.key != "row-03"]
    execute(items, measure, SHARED, tmp_path / "results", ray_address=mode, progress=False)
    assert calls_of(tmp_path / "calls").count("3") == 3 and len(calls_of(tmp_path / "calls")) == 5 + 3


def test_rerun_skips_finished_items(mode, tmp_path, capsys):
    items, results_dir = work(tmp_path / "calls"), tmp_path / "results"
    first = execute(items, measure, SHARED, results_dir, ray_address=mode, progress=False)
    assert len(calls_of(tmp_path / "calls")) == 6
    assert json.loads((results_dir / "row-04.json").read_text()) == first["row-04"]

    assert execute(items, measure, SHARED, results_dir, ray_address=mode, progress=False) == first
    assert len(calls_of(tmp_path / "calls")) == 6  # nothing recomputed

    (results_dir / "row-01.json").write_text('{"row": 1, "norm": 0.')  # a partial write
    (results_dir / "row-04.json").write_text("[1, 2]")  # JSON, but not a result
    assert execute(items, measure, SHARED, results_dir, ray_address=mode, progress=False) == first
    assert calls_of(tmp_path / "calls") == sorted(["0", "1", "1", "2", "3", "4", "4", "5"])
    assert "row-01.json: not a readable result; computing it again" in capsys.readouterr().err
    assert sorted(p.name for p in results_dir.iterdir()) == [f"{item.key}.json" for item in items]  # no partials


def test_without_results_dir_nothing_is_written_or_skipped(tmp_path, monkeypatch):
    items = work(tmp_path / "calls", rows=3)
    monkeypatch.chdir(tmp_path)
    assert execute(items, measure, SHARED, None, progress=False) == execute(items, measure, SHARED, None, progress=False)
    assert len(calls_of(tmp_path / "calls")) == 6
    assert sorted(os.listdir(tmp_path)) == ["calls"]


def test_address_that_does_not_answer_fails_fast(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    items = work(tmp_path / "calls", rows=2)
    start = time.monotonic()
    with pytest.raises(MixquantError, match=r"Ray address 127\.0\.0\.1:1: nothing answers"):
        execute(items, measure, SHARED, None, ray_address="127.0.0.1:1", progress=False)
    assert time.monotonic() - start < 10  # not ray.init's minutes of retrying
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # where "auto" looks first: a cluster gone
    with pytest.raises(MixquantError, match=r"Ray address auto \([\d.]+:1\): nothing answers"):
        execute(items, measure, SHARED, None, ray_address="auto", progress=False)
    with pytest.raises(MixquantError, match="give local, auto or HOST:PORT"):
        execute(items, measure, SHARED, None, ray_address="somewhere", progress=False)
    assert calls_of(tmp_path / "calls") == []


def test_serial_never_imports_ray(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError, as when not installed
    items = work(tmp_path / "calls", rows=2)
    assert list(execute(items, measure, SHARED, None, progress=False)) == ["row-00", "row-01"]
    with pytest.raises(MixquantError, match=r"Ray is not installed; pip install 'mixquant\[ray\]'"):
        execute(items, measure, SHARED, None, ray_address="local", progress=False)


def test_bad_items_are_refused(tmp_path):
    calls = tmp_path / "calls"
    with pytest.raises(MixquantError, match="'a/b': use only letters"):
        execute(work(calls, 1) + [WorkItem("a/b", 1.0, {})], measure, SHARED, None, progress=False)
    with pytest.raises(MixquantError, match="'row-00' is given twice"):
        execute(work(calls, 1) * 2, measure, SHARED, None, progress=False)
    assert calls_of(calls) == []


def test_result_that_is_not_json_stops_the_run(mode, tmp_path):
    results_dir = tmp_path / "results"
    with pytest.raises(MixquantError, match=r"item row-0\d: the task's result is not JSON"):
        execute(work(tmp_path / "calls"), lambda payload, shared: {"x": shared["x"]}, SHARED, results_dir,
                ray_address=mode, progress=False)
    assert list(results_dir.iterdir()) == []
    # the rest was cancelled and the cluster is still usable
    assert execute(work(tmp_path / "calls"), measure, SHARED, results_dir, ray_address=mode, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DRIVER = """
import sys
sys.path.insert(0, {tests!r})
import ray.cloudpickle, test_executor as t
from mixquant.files import handle_sigterm
ray.cloudpickle.register_pickle_by_value(t)
handle_sigterm()  # as the CLI does
calls = t.Path({calls!r})
print(t.execute(t.work(calls), t.{task}, t.SHARED, None, ray_address={address!r}, progress=False) ==
      t.execute(t.work(calls / "serial"), t.measure, t.SHARED, None, progress=False))
"""


def sleep_long(payload: dict, shared: dict) -> dict:
    _note_call(payload)
    time.sleep(600)
    return {}


@pytest.mark.slow
def test_connects_to_a_running_cluster(tmp_path):
    """`ray start --head` in a process of its own, and a driver that connects to it by HOST:PORT,
    disconnects afterwards and leaves the cluster running; a driver stopped by SIGTERM (a CLI run
    killed) gets it as an exception, so that its cleanup runs."""
    pytest.importorskip("ray")
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # a plain cluster, whatever token this machine holds
    head = subprocess.Popen([Path(sys.executable).with_name("ray"), "start", "--head", "--block", f"--port={port}",
                             "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def driver(task: str, calls: Path) -> list[str]:
        code = _DRIVER.format(tests=str(Path(__file__).parent), calls=str(calls), task=task, address=f"127.0.0.1:{port}")
        return [sys.executable, "-c", code]

    try:
        for _ in range(120):  # the head takes seconds to answer
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        run = subprocess.run(driver("measure", tmp_path / "calls"), env=env, capture_output=True, text=True, timeout=120)
        assert run.stdout.strip() == "True", run.stderr[-2000:]
        assert head.poll() is None  # the driver disconnected; the cluster it did not start still runs
        assert len(calls_of(tmp_path / "calls")) == 6  # each item once, on the cluster

        stopped = subprocess.Popen(driver("sleep_long", tmp_path / "long"), env=env, stderr=subprocess.PIPE, text=True)
        while not (tmp_path / "long").exists() or not calls_of(tmp_path / "long"):  # a task is running
            assert stopped.poll() is None
            time.sleep(0.2)
        stopped.terminate()
        _, stderr = stopped.communicate(timeout=60)
        assert stopped.returncode != 0 and ("KeyboardInterrupt" in stderr or "Terminated" in stderr), stderr[-2000:]
        assert "SIGTERM received" not in stderr  # not Ray's handler, which ends the process on the spot
        assert head.poll() is None
    finally:
        head.terminate()  # `ray start --block` stops the processes it started on SIGTERM
        head.wait(timeout=60)
