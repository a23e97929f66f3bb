"""The streaming runtime (mixquant.runtime) and the analysis on it: the model run one unit at a time
gives transformers' own logits; a budget below one unit is refused naming the minimum; the analysis
streamed equals the resident one; an analysis killed mid-way and rerun with --resume gives the
same sensitivity as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model_and_text
from transformers import AutoModelForCausalLM

from mixquant.analyze import analyze
from mixquant.errors import MixquantError
from mixquant.runtime import HiddenStates, StreamedModel, parse_size
from mixquant.source import open_source

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_and_text(tmp_path_factory.mktemp("runtime"), 4000, 7)


def _streamed_logits(sm: StreamedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        h = sm.embed(ids)
        kwargs = sm.block_kwargs(h, torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1))
        for i in range(sm.n_layer):
            with sm.loaded(f"blk.{i}"):
                h = sm.layer(i, h, kwargs[i])
        with sm.loaded("head"):
            return sm.logits(h)


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "streamed"])
def test_streamed_model_gives_transformers_logits(tiny, resident):
    folder, _ = tiny
    src = open_source(folder)
    probe = StreamedModel(src)
    budget = None if resident else probe.min_budget  # the smallest budget: nothing stays loaded
    sm = StreamedModel(src, max_memory=budget)
    assert sm.resident == resident
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    got = _streamed_logits(sm, ids)
    assert not resident or sm._loaded, "a resident model keeps its units"
    assert resident or not sm._loaded, "a streamed model releases every unit"
    assert all(p.device.type == "meta" for p in sm.model.parameters()) != resident
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = ref(input_ids=ids).logits
    assert torch.equal(got, want)


def test_budget_below_one_unit_names_the_minimum(tiny):
    src = open_source(tiny[0])
    need = StreamedModel(src).min_budget
    with pytest.raises(MixquantError, match=r"smaller than one unit .* the minimum is"):
        StreamedModel(src, max_memory=need - 1)


def test_sizes_and_spilled_states(tmp_path):
    assert parse_size("2GB") == 2 * 10**9 and parse_size("800MiB") == 800 * 2**20 and parse_size("123") == 123
    with pytest.raises(MixquantError, match="--max-memory: cannot read"):
        parse_size("lots", "--max-memory")
    x = torch.randn(3, 5, 4)
    for allowance in (None, 8):
        states = HiddenStates((3, 5, 4), allowance, folder=tmp_path)
        assert states.spilled == (allowance == 8)
        states.set(slice(0, 3), x)
        assert torch.equal(states.get(slice(1, 3)), x[1:3])
        states.close()
    assert not list(tmp_path.iterdir()), "the spill file is deleted"


def _damages(sens) -> dict:
    return {n: {t: (c.measured, c.predicted, c.fisher) for t, c in sens[n].types.items()} for n in sens.names}


def test_streamed_analysis_equals_resident(tiny):
    """Batched candidates, each block loaded once per chunk, one unit in memory at a time: the same
    numbers as the resident run (bit for bit: the same products on the same rows)."""
    folder, text = tiny
    kw = dict(text=text, n_windows=2, ctx=48, types=["Q8_0", "Q4_0"], measure="all", fisher=True,
              layer_sweep_types=["Q4_0"], progress=False, threads=1)
    resident = analyze(folder, None, **kw)
    streamed = analyze(folder, None, max_memory=StreamedModel(open_source(folder)).min_budget, **kw)
    assert resident.settings["resident"] and not streamed.settings["resident"]
    assert _damages(streamed) == _damages(resident)
    assert [(x.layer, x.type, x.kld) for x in streamed.layer_sweep] == \
        [(x.layer, x.type, x.kld) for x in resident.layer_sweep]
    measured = [c.measured for n in resident.names for t, c in resident[n].types.items() if t == "Q4_0"]
    assert measured and all(m > 0 for m in measured)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_large_tensors_in_row_slices_equal_whole(tiny, monkeypatch, tmp_path, method):
    """A tensor too large to copy (a big vocabulary's embedding) is read, quantized, swapped in and
    put back a slice of rows at a time: the same logits and damages as whole. Here every 2-D tensor
    that the adapter does not permute counts as large, in slices of 7 rows."""
    import mixquant.analyze.run as run
    import mixquant.runtime.model as model
    from mixquant.calibrate import calibrate
    from mixquant.text import read_text

    folder, text = tiny
    src = open_source(folder)
    assert np.array_equal(src.tensor_rows("token_embd.weight", 5, 17), src.tensor("token_embd.weight")[5:17])
    assert np.array_equal(src.tensor_rows("blk.0.attn_q.weight", 3, 9), src.tensor("blk.0.attn_q.weight")[3:9])
    kw = dict(text=text, n_windows=2, ctx=48, types=["Q8_0", "Q4_0"], measure="all", fisher=True,
              progress=False, threads=1, max_memory=StreamedModel(src).min_budget, method=method)
    if method == "gptq":  # GPTQ rounds each row on its own too: slices give the same codes
        cal = calibrate(folder, read_text(text), 48, 6, progress=False, activations=False, output_importance=True,
                        hessians=True)
        kw["hessians"] = cal.hessians.save(tmp_path / "hessians.safetensors")
    whole = analyze(folder, None, **kw)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    want = _streamed_logits(StreamedModel(src, max_memory=kw["max_memory"]), ids)

    monkeypatch.setattr(model, "SLICED_BYTES", 0)
    monkeypatch.setattr(run, "SLICED_BYTES", 0)
    monkeypatch.setattr(model, "slice_rows", lambda cols, multiple=1: 7)
    monkeypatch.setattr(run._Sliced, "rows_per_slice", staticmethod(lambda cols: 7))
    sm = StreamedModel(src, max_memory=kw["max_memory"])
    shape = next(t.shape for t in src.model.tensors if t.name == "token_embd.weight")
    assert isinstance(sm._provided("token_embd.weight", shape), model.RowSlices)
    assert torch.equal(_streamed_logits(sm, ids), want)
    sliced = analyze(folder, None, **kw)
    a, b = _damages(whole), _damages(sliced)
    assert a.keys() == b.keys()
    for name in a:
        for typ, (measured, predicted, fisher) in a[name].items():
            got = b[name][typ]
            # the measurement runs the same values; only the predicted error's float64 sums are
            # grouped otherwise when a slice is not a whole multiple of its step
            assert (got[0], got[2]) == (measured, fisher), (name, typ)
            assert got[1] == pytest.approx(predicted, rel=1e-12, abs=0), (name, typ)


def _analyze_argv(folder, text, out) -> list[str]:
    return [sys.executable, "-m", "mixquant.cli", "analyze", str(folder), "--text", str(text), "-o", str(out),
            "--ctx", "48", "--chunks", "4", "--windows", "2", "--types", "Q8_0,Q4_0,Q5_1,Q2_K", "--threads", "1",
            "--no-report", "--no-hessians"]


def _sensitivity(out: Path) -> dict:
    d = json.loads((out / "sensitivity.json").read_text())
    return {"tensors": d["tensors"], "layer_sweep": d["layer_sweep"], "reference": d["reference"]}


def test_killed_analysis_resumes_to_identical_results(tiny, tmp_path):
    """SIGKILL once the first work items are written; --resume skips them and the sensitivity file
    equals an uninterrupted run's (timings aside)."""
    folder, text = tiny
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    whole = tmp_path / "whole"
    subprocess.run(_analyze_argv(folder, text, whole), env=env, check=True, capture_output=True)
    assert not (whole / ".measure").exists(), "a finished analysis leaves no state behind"

    out = tmp_path / "killed"
    proc = subprocess.Popen(_analyze_argv(folder, text, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and len(list((out / ".measure").glob("*.json"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name for p in (out / ".measure").glob("*.json")}
    assert done and not (out / "sensitivity.json").exists(), "killed after some work items, before the end"

    again = subprocess.run([*_analyze_argv(folder, text, out), "--resume"], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {len(done)} finished work items" in again.stderr
    assert _sensitivity(out) == _sensitivity(whole)

    # a state from other settings is refused under --resume, not silently mixed in
    (out / ".measure").mkdir()
    (out / ".measure" / "fingerprint").write_text("other\n")
    refused = subprocess.run([*_analyze_argv(folder, text, out), "--resume"], env=env, capture_output=True, text=True)
    assert refused.returncode == 1 and "rerun without --resume" in refused.stderr
    assert refused.stderr.count("\n") == 1, refused.stderr


def test_work_items_one_per_unit_costed_by_what_they_rerun(tiny):
    """The measurement is split into one work item per unit, each costed by what it reruns."""
    from mixquant.analyze.run import _work_items

    src = open_source(tiny[0])
    plan = [(t.name, ["F32", "Q4_0"], ["Q4_0"]) for t in src.model.tensors if t.name.endswith("attn_v.weight")]
    items = _work_items(plan, ["Q4_0"], src.model, src.model.n_layer, None, True)
    assert [i.key for i in items] == ["blk.0", "blk.1"]
    assert items[0].cost > items[1].cost, "an early block reruns more of the model"
    assert np.isfinite([i.cost for i in items]).all()


def test_ray_analysis_equals_serial(tiny):
    """The same work items as Ray tasks on a local 2-CPU cluster: the same sensitivity."""
    pytest.importorskip("ray")
    folder, text = tiny
    kw = dict(text=text, n_windows=2, ctx=48, types=["Q8_0", "Q4_0"], measure="all", layer_sweep_types=["Q2_K"],
              progress=False, threads=1)
    serial = analyze(folder, None, **kw)
    spread = analyze(folder, None, ray="local", **kw)
    assert _damages(spread) == _damages(serial)
    assert [(x.layer, x.kld) for x in spread.layer_sweep] == [(x.layer, x.kld) for x in serial.layer_sweep]
    # gptq: the workers read the Hessians file and round with the analysis's GPTQ options
    from mixquant.calibrate import calibrate
    from mixquant.text import read_text

    hessians = calibrate(folder, read_text(text), 48, 4, progress=False, activations=False,
                         hessians=True).hessians.save(folder.parent / "hessians.safetensors")
    kw.update(measure="none", layer_sweep_types=[], method="gptq", hessians=hessians)
    serial = analyze(folder, None, gptq_options={"damp": 0.1, "act_order": True}, **kw)
    spread = analyze(folder, None, ray="local", gptq_options={"damp": 0.1, "act_order": True}, **kw)
    assert _damages(spread) == _damages(serial) != _damages(analyze(folder, None, **kw))


def test_devices_and_dtypes(tiny):
    """--device auto takes what torch sees; --dtype bfloat16 runs the same pass at lower precision."""
    from mixquant.runtime import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type in (expected, "mps")
    with pytest.raises(MixquantError, match="--device must be one of"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(MixquantError, match="no CUDA device"):
            resolve_device("cuda")
    src = open_source(tiny[0])
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    f32 = _streamed_logits(StreamedModel(src), ids)
    bf16 = _streamed_logits(StreamedModel(src, dtype="bfloat16"), ids)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, f32)
    assert torch.allclose(bf16, f32, atol=0.1 * float(f32.abs().max()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_analysis_agrees_with_cpu(tiny):
    folder, text = tiny
    kw = dict(text=text, n_windows=2, ctx=48, types=["Q4_0"], measure="all", progress=False, threads=1)
    cpu = analyze(folder, None, **kw)
    gpu = analyze(folder, None, device="cuda", **kw)
    for name in cpu.names:
        for typ, c in cpu[name].types.items():
            if c.measured:
                assert gpu[name].types[typ].measured == pytest.approx(c.measured, rel=1e-3)
