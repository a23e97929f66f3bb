"""Calibration through the streaming runtime: one block in memory at a time gives what the resident
model gives (imatrix, activation statistics, Hessians); its peak RSS keeps to the budget; a budget
below one unit is refused, naming the minimum."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import mixquant.runtime
from mixquant.calibrate import calibrate, read_imatrix
from mixquant.errors import MixquantError
from mixquant.runtime import StreamedModel
from mixquant.source import open_source

from conftest import make_tiny_llama, random_text
from test_hostile import run_subprocess

# Streamed and resident runs differ only in how many windows share one block call (a matrix product
# of more rows may round differently in float32, ~1e-7 relative per value) and in nothing else: the
# hooks see the same windows in the same order. Sums of squares, moments and Hessians over a few
# hundred tokens therefore agree to a few float32 roundings.
RTOL = 1e-5


def _min_budget(folder: Path) -> int:
    with open_source(folder) as src:
        return StreamedModel(src, max_memory=1 << 40).min_budget


@pytest.fixture(scope="module")
def smol_folder() -> Path:
    from mixquant.testdata import build_test_model

    return build_test_model()


@pytest.fixture(scope="module")
def calib_text() -> str:
    from mixquant.testdata import build_test_text
    from mixquant.text import read_text

    return read_text(build_test_text()[0])


@pytest.fixture
def recorded(monkeypatch):
    """The StreamedModel and HiddenStates that calibrate builds, for asserting how it ran."""
    made: dict[str, list] = {"models": [], "states": []}

    class Model(StreamedModel):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made["models"].append(self)

    class States(mixquant.runtime.HiddenStates):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made["states"].append(self)

    monkeypatch.setattr(mixquant.runtime, "StreamedModel", Model)
    monkeypatch.setattr(mixquant.runtime, "HiddenStates", States)
    return made


def _assert_same(a, b):
    assert a.imatrix.names == b.imatrix.names
    assert a.imatrix.counts == b.imatrix.counts
    for name in a.imatrix.names:
        np.testing.assert_allclose(a.imatrix.sums[name], b.imatrix.sums[name], rtol=RTOL, err_msg=name)
    if a.activations is not None:
        assert sorted(a.activations.stats) == sorted(b.activations.stats)
        for key, sa in a.activations.stats.items():
            sb = b.activations.stats[key]
            da, db = sa.dist, sb.dist
            assert (da.count, sa.n_tokens) == (db.count, sb.n_tokens), key
            np.testing.assert_allclose([da.absmax, da.std, da.kurtosis, sa.dynamic_range],
                                       [db.absmax, db.std, db.kurtosis, sb.dynamic_range], rtol=RTOL, err_msg=key)
            assert da.mean == pytest.approx(db.mean, rel=RTOL, abs=RTOL * da.std), key
            np.testing.assert_allclose(da.hist_edges, db.hist_edges, rtol=RTOL, atol=RTOL * da.std, err_msg=key)
            # a value within float rounding of a bin edge may fall on the other side of it
            assert np.abs(np.subtract(da.hist_counts, db.hist_counts)).sum() <= 2, key
            assert [c.channel for c in sa.top_channels[:3]] == [c.channel for c in sb.top_channels[:3]], key
    if a.hessians is not None:
        assert a.hessians.rows == b.hessians.rows
        for key in a.hessians.rows:
            ha, hb = a.hessians.matrix(key), b.hessians.matrix(key)
            scale = np.sqrt(np.outer(np.diag(hb), np.diag(hb)))  # off-diagonal entries: relative to this
            assert (np.abs(ha - hb) <= RTOL * scale).all(), key


def test_streamed_tiny_model_spills_and_equals_resident(tmp_path, recorded):
    """Just above the minimum budget: every unit loaded and released, one window per block call,
    the hidden states in a temporary file; every output of calibrate as in the resident run."""
    folder = make_tiny_llama(tmp_path / "tied", vocab_size=300, intermediate_size=96, tie_word_embeddings=True)
    text = random_text(300, 1)
    kw = {"ctx": 68, "chunks": 3, "progress": False, "kv_f16": False, "output_importance": True, "hessians": True,
          "n_batch": 136, "n_ubatch": 48}
    resident = calibrate(folder, text, **kw)
    assert recorded["models"][-1].resident and not recorded["states"][-1].spilled
    streamed = calibrate(folder, text, max_memory=_min_budget(folder) + 1024, **kw)
    assert not recorded["models"][-1].resident and recorded["states"][-1].spilled
    _assert_same(streamed, resident)


@pytest.mark.slow
def test_streamed_test_model_equals_resident(smol_folder, calib_text, recorded):
    """SmolLM2-135M (with the f16 KV rounding) just above its minimum budget, several windows per
    block call, against the resident run that runs all windows in one call per block."""
    kw = {"ctx": 128, "chunks": 4, "progress": False, "output_importance": True, "hessians": True}
    resident = calibrate(smol_folder, calib_text, **kw)
    streamed = calibrate(smol_folder, calib_text, max_memory=_min_budget(smol_folder) + (20 << 20), **kw)
    assert recorded["models"][0].resident and not recorded["models"][1].resident
    _assert_same(streamed, resident)


def test_budget_below_the_minimum_names_it(tmp_path):
    folder = make_tiny_llama(tmp_path / "tied", vocab_size=300, intermediate_size=96, tie_word_embeddings=True)
    need = _min_budget(folder)
    with pytest.raises(MixquantError, match=r"the minimum is") as err:
        calibrate(folder, random_text(300, 1), ctx=68, chunks=1, progress=False, max_memory=need - 1)
    assert str(err.value).count("\n") == 0
    code, stderr, _ = run_subprocess(["imatrix", folder, "--text", _text_file(tmp_path), "--ctx", 68, "--chunks", 1,
                                      "--max-memory", need - 1, "-o", tmp_path / "out.gguf"])
    assert code == 1 and stderr.strip().startswith("mixquant: error:") and "the minimum is" in stderr
    assert not (tmp_path / "out.gguf").exists()


def _text_file(tmp_path: Path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(random_text(300, 1))
    return path


# --------------------------------------------------------------------------------------------
# peak memory of a streamed calibration of a model larger than its budget

# What the process holds besides the budget (issue #10's aim: under 700 MB; here MiB): Python, torch, transformers
# and the tokenizer (about 400 MB), and while a unit loads, its float32 conversion from the mapped bf16
# file (about half a unit more than the budget's unit + working memory). Measured: 555 MiB for this
# model (largest unit: the 201 MB token embedding); a resident run would add the whole 888 MB model.
OVERHEAD_MB = 700


def _random_llama(folder: Path, tokenizer_folder: Path, n_layer: int, n_embd: int, n_ff: int) -> int:
    """A random bf16 Llama with the test model's tokenizer (tied output); returns its float32 bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    vocab = json.loads((tokenizer_folder / "config.json").read_text())["vocab_size"]
    config = LlamaConfig(vocab_size=vocab, hidden_size=n_embd, intermediate_size=n_ff, num_hidden_layers=n_layer,
                         num_attention_heads=n_embd // 64, num_key_value_heads=n_embd // 256, head_dim=64,
                         tie_word_embeddings=True, max_position_embeddings=2048, torch_dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    tensors = {k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16)
               for k, s in shapes.items() if k != "lm_head.weight"}
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(folder)
    for f in tokenizer_folder.glob("tokenizer*"):
        shutil.copy(f, folder / f.name)
    return 4 * sum(t.numel() for t in tensors.values())


@pytest.mark.slow
def test_streamed_peak_rss_keeps_to_the_budget(tmp_path, smol_folder, calib_text):
    folder = tmp_path / "llama-random"
    f32_bytes = _random_llama(folder, smol_folder, n_layer=12, n_embd=1024, n_ff=4096)
    budget = _min_budget(folder) + (40 << 20)
    assert budget < f32_bytes  # the model does not fit
    text = tmp_path / "calib.txt"
    text.write_text(calib_text)
    out = tmp_path / "imatrix.gguf"
    code, stderr, peak_mb = run_subprocess(["imatrix", folder, "--text", text, "--ctx", 128, "--chunks", 4,
                                            "--max-memory", budget, "-o", out], timeout=600)
    assert code == 0, stderr
    assert len(read_imatrix(out).names) == 12 * 7
    print(f"model {f32_bytes / 2**20:.0f} MiB in float32, budget {budget / 2**20:.0f} MiB, peak RSS {peak_mb:.0f} MB")
    assert peak_mb < budget / 2**20 + OVERHEAD_MB
