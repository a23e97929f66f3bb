"""AWQ (`quantize --method awq`, `awq+gptq`): scales folded exactly into norms and v/up rows (the
float model's function unchanged, in transformers and in llama.cpp), alpha = 0 is round-to-nearest
byte for byte, the scale search never raises its own objective, one-line errors."""

import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from mixquant import formats
from mixquant.hessians import Hessians
from mixquant.quantize.awq import AwqScales, ScaledSource, search_scales
from mixquant.source import open_source

from conftest import run_quantize as run


@pytest.fixture(scope="module")
def tiny(tiny_calibrated) -> dict[str, Path]:
    return tiny_calibrated


def random_scales(src, seed: int = 0) -> AwqScales:
    """Every fold of the model with a random positive scale (a spread of e^±1: far from identity)."""
    rng = np.random.default_rng(seed)
    folds = src.adapter.folds(src.model)
    return AwqScales(folds, [np.exp(rng.uniform(-1, 1, f.channels)) for f in folds], [0.5] * len(folds))


def folded_kl(folder: Path) -> float:
    """Mean KL between the next-token distributions of the model and of the model with random scales
    folded in (weights put back through the adapter), float64, on 48 tokens."""
    from transformers import AutoModelForCausalLM

    with open_source(folder) as src:
        scales = random_scales(src)
        assert scales.folds, "no folds"
        plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
        moved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
        params = src.adapter.parameters(moved, src.model)
        changed = 0
        with torch.no_grad():
            for name, p in params.items():
                if scales.changes(name):
                    x = src.adapter.from_gguf(name, scales.weight(name, src.tensor(name)), src.model)
                    p.copy_(torch.from_numpy(x).to(p.dtype))
                    changed += 1
        assert changed >= 4 * src.model.n_layer  # norms, and every linear reading or making a channel
        ids = torch.arange(48)[None] * 7 % plain.config.vocab_size
        with torch.no_grad():
            p_log = plain(ids).logits.log_softmax(-1)[0]
            q_log = moved(ids).logits.log_softmax(-1)[0]
            far = plain.model.layers[0].self_attn.v_proj.weight.sub(moved.model.layers[0].self_attn.v_proj.weight) \
                if hasattr(plain.model.layers[0].self_attn, "v_proj") else None
        if far is not None:
            assert far.abs().max() > 1e-3  # the weights did move
        return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


def test_folding_is_exact_llama_gqa(tiny):
    assert folded_kl(tiny["model"]) < 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_folding_is_exact_gemma3_and_phi3(family, tmp_path):
    """Gemma's (1 + w) norms (folded in GGUF values, so (1 + w) / s - 1 back in transformers'), 4
    query heads on 1 kv head; Phi-3's fused qkv (V rows) and gate_up (the up half)."""
    import shutil

    from test_arch import make_tiny_gemma3, make_tiny_phi3

    from mixquant.testdata import build_test_model

    tok = tmp_path / "tok"
    tok.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(build_test_model() / f, tok / f)
    folder = {"gemma3": make_tiny_gemma3, "phi3": make_tiny_phi3}[family](tmp_path / "model", tok)
    assert folded_kl(folder) < 1e-9



def test_alpha_zero_is_round_to_nearest_byte_for_byte(tiny, tmp_path, capsys):
    rtn, awq = tmp_path / "rtn.gguf", tmp_path / "awq.gguf"
    common = ["Q4_K_M", "--imatrix", tiny["imatrix"], "--tensor-type", "attn=Q4_0", "--tensor-type", "ffn=Q5_1"]
    assert run(capsys, tiny["model"], rtn, *common)[0] == 0
    rc, err = run(capsys, tiny["model"], awq, *common, "--method", "awq", "--hessians", tiny["hessians"],
                  "--awq-grid", "1")
    assert rc == 0 and "awq: 0 of 8 folds scaled" in err, err
    assert rtn.read_bytes() == awq.read_bytes()


def _objective(w, rows, col, type_name, imp, h) -> float:
    """sum over rows r^2 |(W/r - Q) ...|_H: the error of W with its rows divided by `rows` and its
    columns multiplied by `col` for quantizing, measured in the original output and input scale."""
    w = w / rows[:, None]
    scaled = (w * col).astype(np.float32)
    q = formats.dequantize(formats.quantize(scaled, type_name, None if imp is None else imp / col**2),
                           type_name, w.shape) / col
    d = (w - q).astype(np.float64)
    return float(np.einsum("ij,ij,i->", d @ h, d, rows.astype(np.float64) ** 2))


@pytest.mark.parametrize("preset", ["Q4_0", "Q2_K"])
def test_the_search_never_raises_its_objective_and_lowers_it(tiny, preset):
    from mixquant.calibrate import read_imatrix
    from mixquant.plan import preset_plan

    hess = Hessians.load(tiny["hessians"])
    imatrix = read_imatrix(tiny["imatrix"]).as_dict()
    with open_source(tiny["model"]) as src:
        types = dict(preset_plan(src.model, preset, tensor_types=["ffn_down=Q4_K"] if preset == "Q2_K" else [],
                                 has_imatrix=True).types)
        scales = search_scales(src, types, hess, imatrix, grid=10, threads=1)
        assert scales.scaled >= 4, scales.summary()
        rows_of = {}
        total_awq = total_one = 0.0
        for fold, s in zip(scales.folds, scales.scales):
            col = np.ones(src.shape(fold.targets[0])[-1]) if s is None else \
                (s if fold.column_channel is None else s[fold.column_channel])
            awq = one = 0.0
            for name in fold.targets:
                w = src.tensor(name).astype(np.float64)
                rows = rows_of.get(name, np.ones(w.shape[0]))
                args = types[name], imatrix.get(name), hess.matrix(fold.input_key)
                awq += _objective(w, rows, col, *args)
                one += _objective(w, rows, np.ones_like(col), *args)
            assert awq <= one * (1 + 1e-6), (fold.feeder, awq, one)
            total_awq, total_one = total_awq + awq, total_one + one
            if s is not None and len(src.shape(fold.feeder)) == 2:
                rows_of[fold.feeder] = np.ones(src.shape(fold.feeder)[0])
                rows_of[fold.feeder][fold.rows] = s
        assert total_awq < 0.99 * total_one, (total_awq, total_one)  # 3% on this random model at Q4_0


def _perplexity(model: Path, text: Path) -> float:
    from mixquant.reference import llama_tool

    for _ in range(4):  # llama.cpp's log thread can lose its last lines at exit on a loaded machine: ask again
        done = subprocess.run([str(llama_tool("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", "128",
                               "-b", "128", "--chunks", "2", "-t", "1"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        m = re.search(r"\[2\]([0-9.]+),", done.stdout)  # the running PPL after the last chunk: the estimate
        if m:
            return float(m.group(1))
    raise AssertionError((done.stdout + done.stderr)[-2000:])


def test_llama_cpp_loads_awq_files_and_runs_the_folded_model_unchanged(tiny, tmp_path, capsys):
    """A float32 GGUF with random scales folded in gives llama.cpp's perplexity of the plain one; the
    Q4_0 awq and awq+gptq files load and are close to round-to-nearest's."""
    from mixquant.export import write_gguf
    from mixquant.plan import preset_plan

    with open_source(tiny["model"]) as src:
        plain, folded = tmp_path / "f32.gguf", tmp_path / "f32-folded.gguf"
        write_gguf(src, preset_plan(src.model, "F32"), plain, progress=False)
        write_gguf(ScaledSource(src, random_scales(src)), preset_plan(src.model, "F32"), folded, progress=False)
    assert plain.read_bytes() != folded.read_bytes()
    base = _perplexity(plain, tiny["text"])
    assert math.isclose(_perplexity(folded, tiny["text"]), base, rel_tol=5e-4)  # float32 rounding of the folds: 5e-5 measured
    ppl = {}
    for method in ("rtn", "awq", "awq+gptq"):
        out = tmp_path / f"{method}.gguf"
        extra = [] if method == "rtn" else ["--hessians", tiny["hessians"]]
        assert run(capsys, tiny["model"], out, "Q4_0", "--imatrix", tiny["imatrix"], "--method", method, *extra)[0] == 0
        ppl[method] = _perplexity(out, tiny["text"])
        types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
        assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert all(abs(math.log(p / base)) < 0.2 for p in ppl.values()), (base, ppl)


@pytest.mark.parametrize("args, message", [
    (["--method", "awq"], "--method awq needs --hessians FILE"),
    (["--method", "awq+gptq", "--hessians", "{old}"], "no mean |x| statistics for blk.0."),
    (["--method", "awq", "--hessians", "{partial}"], "no Hessian for blk.1.ffn_down_in"),
    (["--method", "awq", "--hessians", "{hessians}", "--awq-grid", "0"], "--awq-grid must be at least 1"),
])
def test_bad_awq_input_is_one_line_and_writes_nothing(tiny, tmp_path, capsys, args, message):
    full = Hessians.load(tiny["hessians"])
    sums = {k: full.matrix(k) for k in full.rows}
    old = Hessians(model=full.model, rows=full.rows, sums=sums).save(tmp_path / "old.safetensors")  # no mean |x|
    keep = [k for k in full.rows if k != "blk.1.ffn_down_in"]
    partial = Hessians(model=full.model, rows={k: full.rows[k] for k in keep}, sums={k: sums[k] for k in keep},
                       abs_sums={k: full.abs_sums.get(k, full.mean_abs(k) * full.rows[k]) for k in keep})
    partial = partial.save(tmp_path / "partial.safetensors")
    out = tmp_path / "o.gguf"
    rc, err = run(capsys, tiny["model"], out, "Q4_0",
                  *[a.format(hessians=tiny["hessians"], old=old, partial=partial) for a in args])
    assert rc == 1 and err.count("\n") == 1 and err.startswith("mixquant: error:") and message in err, err
    assert not list(tmp_path.glob("o.gguf*"))


def test_an_architecture_without_folds_is_refused(tiny, tmp_path, capsys, monkeypatch):
    from mixquant.arch import for_gguf_arch

    monkeypatch.setattr(type(for_gguf_arch("llama")), "norm_feeds", {})
    rc, err = run(capsys, tiny["model"], tmp_path / "o.gguf", "Q4_0", "--method", "awq", "--hessians",
                  tiny["hessians"])
    assert rc == 1 and "AWQ needs the architecture's norm -> linear mapping" in err, err
    assert not (tmp_path / "o.gguf").exists()


def test_hessians_file_keeps_mean_abs_beside_each_hessian(tiny):
    """calibration's sum |x| per channel, read back from the file: (E|x|)^2 <= E[x^2] = diag(H)/rows,
    channel by channel, and not far below it (activations are no single spikes)."""
    hess = Hessians.load(tiny["hessians"])
    assert set(hess.rows) == {f"blk.{i}.{k}" for i in range(2)
                              for k in ("attn_in", "attn_output_in", "ffn_in", "ffn_down_in")}
    for key in hess.rows:
        m, ms = hess.mean_abs(key), np.diagonal(hess.matrix(key)) / hess.rows[key]
        assert m.shape == ms.shape and (m > 0).all()
        assert (m**2 <= ms * (1 + 1e-9)).all() and (m**2 > 0.2 * ms).all(), key


def test_hessians_of_another_model_are_refused(tiny, tmp_path, capsys):
    other = Hessians.load(tiny["hessians"])
    other.sums = {k: np.eye(32) for k in other.rows}  # a model with 32 columns everywhere
    other.abs_sums = {k: np.ones(32) for k in other.rows}
    other.model = {**other.model, "n_embd": 32}
    path = other.save(tmp_path / "other.safetensors")
    rc, err = run(capsys, tiny["model"], tmp_path / "o.gguf", "Q4_0", "--method", "awq", "--hessians", path)
    assert rc == 1 and "Hessians are for another model (n_embd 32, this model has 64)" in err, err
    assert not (tmp_path / "o.gguf").exists()
