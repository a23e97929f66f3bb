"""quantize --method gptq end to end on a tiny llama: Hessians from `mixquant imatrix --hessians` or
calibrated on the fly, ordinary GGUF blocks with lower output error than rtn, one-line errors."""

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from mixquant import formats
from mixquant.calibrate import input_of
from mixquant.hessians import Hessians
from mixquant.quantize import output_error
from mixquant.source import open_source

from conftest import run_quantize as run


@pytest.fixture(scope="module")
def tiny(tiny_calibrated) -> dict[str, Path]:
    return tiny_calibrated



def _tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).view(np.uint8).reshape(-1)) for t in GGUFReader(path).tensors}


def test_gptq_writes_ordinary_blocks_with_lower_output_error(tiny, tmp_path, capsys):
    rtn, gptq, default = tmp_path / "rtn.gguf", tmp_path / "gptq.gguf", tmp_path / "default.gguf"
    common = [tiny["model"], "Q4_0", "--imatrix", tiny["imatrix"]]
    assert run(capsys, tiny["model"], default, *common[1:])[0] == 0
    assert run(capsys, tiny["model"], rtn, *common[1:], "--method", "rtn")[0] == 0
    rc, err = run(capsys, tiny["model"], gptq, *common[1:], "--method", "gptq", "--hessians", tiny["hessians"])
    assert rc == 0 and "gptq: 14 tensors rounded with error feedback" in err, err
    assert default.read_bytes() == rtn.read_bytes()
    a, b = _tensors(rtn), _tensors(gptq)
    assert a.keys() == b.keys() and all(a[n][0] == b[n][0] for n in a)
    hess = Hessians.load(tiny["hessians"])
    with open_source(tiny["model"]) as src:
        for name, (type_name, data) in a.items():
            key = input_of(name)
            if key is None or type_name == "F32":
                assert np.array_equal(data, b[name][1]), name  # norms, the token embedding: unchanged
                continue
            w = src.tensor(name).reshape(-1, src.tensor(name).shape[-1])
            h = hess.matrix(key)
            e_rtn = output_error(w, formats.dequantize(data, type_name, w.shape), h)
            e_gptq = output_error(w, formats.dequantize(b[name][1], type_name, w.shape), h)
            assert e_gptq < e_rtn, (name, e_gptq, e_rtn)


def test_threads_round_shares_of_rows_to_the_same_bytes(tiny, tmp_path, capsys, monkeypatch):
    """--threads N rounds each tensor's rows in N shares at once (rows are independent under GPTQ):
    the file is byte for byte the one-thread file, and torch's own thread setting is left as it was."""
    import torch

    import mixquant.quantize.gptq as gptq

    monkeypatch.setattr(gptq, "_MIN_THREAD_ROWS", 8)  # the tiny model's 64-row tensors in shares too
    before = torch.get_num_threads()
    files = {n: tmp_path / f"t{n}.gguf" for n in (1, 3)}
    for n, path in files.items():
        assert run(capsys, tiny["model"], path, "Q4_K_M", "--imatrix", tiny["imatrix"], "--method", "gptq",
                   "--hessians", tiny["hessians"], "--threads", n)[0] == 0
    assert files[1].read_bytes() == files[3].read_bytes()
    assert torch.get_num_threads() == before


def test_gptq_refit_changes_only_scales_and_lowers_the_error(tiny, tmp_path, capsys):
    """--gptq-refit: the same codes, refitted block scales, a Hessian-weighted error (dampened H, what
    the refit minimises) no higher in any tensor; --no-gptq-refit is the plain sweep."""
    from mixquant.quantize.gptq import dampened

    files = {flag: tmp_path / f"{flag}.gguf" for flag in ("--gptq-refit", "--no-gptq-refit")}
    for flag, out in files.items():
        rc, err = run(capsys, tiny["model"], out, "Q4_1", "--imatrix", tiny["imatrix"], "--method", "gptq",
                      "--hessians", tiny["hessians"], flag, "--gptq-damp", "0.02")
        assert rc == 0, err
    plain, refit = _tensors(files["--no-gptq-refit"]), _tensors(files["--gptq-refit"])
    hess = Hessians.load(tiny["hessians"])
    lower = 0
    with open_source(tiny["model"]) as src:
        for name, (type_name, data) in plain.items():
            key = input_of(name)
            if key is None or type_name != "Q4_1":
                continue
            w = src.tensor(name).reshape(-1, src.tensor(name).shape[-1])
            h = dampened(hess.matrix(key), 0.02)
            fr = formats.get(type_name).frozen(True)
            a, b = (x.reshape(-1, formats.get(type_name).type_size) for x in (data, refit[name][1]))
            assert np.array_equal(fr.layout.unpack(a), fr.layout.unpack(b)), name
            e_plain, e_refit = (output_error(w, formats.dequantize(x, type_name, w.shape), h) for x in (a, b))
            assert e_refit <= e_plain * (1 + 1e-12), name
            lower += e_refit < e_plain
    assert lower >= 10, lower


def test_gptq_calibrates_on_the_fly_and_takes_any_plan(tiny, tmp_path, capsys):
    out = tmp_path / "fly.gguf"
    rc, err = run(capsys, tiny["model"], out, "Q5_1", "--tensor-type", "ffn_down=Q8_0", "--method", "gptq",
                  "--text", tiny["text"])
    assert rc == 0 and "hessians: calibrated on" in err, err
    types = {n: t for n, (t, _) in _tensors(out).items()}
    assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q5_1"


@pytest.mark.parametrize("args, message", [
    (["--method", "gptq"], "--method gptq needs --hessians FILE"),
    (["--hessians", "{hessians}"], "--hessians goes with --method gptq"),
    (["--gptq-damp", "0.1"], "--gptq-damp goes with --method gptq or awq+gptq"),
    (["--method", "awq", "--hessians", "{hessians}", "--no-gptq-refit"], "--no-gptq-refit goes with --method gptq"),
    (["--method", "gptq", "--hessians", "{cut}"], "cut.safetensors"),
    (["--method", "gptq", "--hessians", "{imatrix}"], "not a readable Hessians file"),
    (["--method", "gptq", "--hessians", "{hessians}", "--gptq-damp", "-0.5"], "--gptq-damp must be a finite fraction"),
    (["--method", "gptq", "--hessians", "{hessians}", "--gptq-damp", "inf"], "--gptq-damp must be a finite fraction"),
    (["--method", "gptq", "--hessians", "{hessians}", "--no-gptq-refit", "--gptq-resweeps", "1"], "--no-gptq-refit"),
])
def test_bad_gptq_input_is_one_line_and_writes_nothing(tiny, tmp_path, capsys, args, message):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny["hessians"].read_bytes()[:100_000])
    out = tmp_path / "o.gguf"
    rc, err = run(capsys, tiny["model"], out, "Q4_0",
                  *[a.format(hessians=tiny["hessians"], cut=cut, imatrix=tiny["imatrix"]) for a in args])
    assert rc == 1 and err.count("\n") == 1 and err.startswith("mixquant: error:") and message in err, err
    assert not list(tmp_path.glob("*.gguf*"))


def test_hessians_of_another_model_are_refused(tiny, tmp_path, capsys):
    other = Hessians.load(tiny["hessians"])
    other.sums = {k: np.eye(32) for k in other.rows}  # a model with 32 columns everywhere
    other.model = {**other.model, "n_embd": 32}
    path = other.save(tmp_path / "other.safetensors")
    rc, err = run(capsys, tiny["model"], tmp_path / "o.gguf", "Q4_0", "--method", "gptq", "--hessians", path)
    assert rc == 1 and "Hessians are for another model (n_embd 32, this model has 64)" in err, err
    assert not (tmp_path / "o.gguf").exists()
