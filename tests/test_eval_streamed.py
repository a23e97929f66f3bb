"""Evaluation through the streaming runtime: one block in memory at a time gives the numbers of the
resident model, keeps to its memory budget, and refuses a budget too small for one block."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_llama, random_text

from mixquant.errors import MixquantError
from mixquant.evaluate import Evaluator

ROOT = Path(__file__).resolve().parents[1]


def _same_result(a, b) -> None:
    for field in ("ppl", "ppl_ref", "kld_mean", "kld_median", "kld_p99", "top1"):
        x, y = getattr(a, field), getattr(b, field)
        assert math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-12), (field, x, y)
    assert (a.bytes, a.tokens, a.chunks) == (b.bytes, b.tokens, b.chunks)


@pytest.mark.slow
def test_streamed_eval_equals_resident(tmp_path, monkeypatch):
    """The test model at a budget just above the minimum (no unit stays loaded, the hidden states
    spill to disk) against the resident run: the same reference and the same Q4_0 result."""
    from mixquant.runtime import windows
    from mixquant.testdata import build_test_model, build_test_text

    folder, (_, text) = build_test_model(), build_test_text()
    kw = dict(ctx=64, chunks=2, progress=False, threads=1)
    with Evaluator(folder, text, cache=tmp_path / "resident", **kw) as ev:
        assert ev.runtime.resident
        minimum = ev.runtime.min_budget
        ref, q4 = ev.reference(), ev.evaluate_plan("Q4_0")

    spilled = []

    class Recorded(windows.HiddenStates):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            spilled.append(self.spilled)

    monkeypatch.setattr(windows, "HiddenStates", Recorded)
    with Evaluator(folder, text, cache=tmp_path / "streamed", max_memory=minimum + 1, **kw) as ev:
        assert not ev.runtime.resident
        sref, sq4 = ev.reference(), ev.evaluate_plan("Q4_0")
        with pytest.raises(MixquantError, match="half the memory budget"):
            ev.model  # noqa: B018 - the whole model at once does not fit
    assert spilled == [True, True]  # the reference pass and the plan's
    assert np.allclose(sref.nll, ref.nll, rtol=1e-6, atol=0) and np.array_equal(sref.top1, ref.top1)
    assert np.array_equal(np.asarray(sref.codes), np.asarray(ref.codes))
    assert math.isclose(sref.ppl, ref.ppl, rel_tol=1e-6)
    _same_result(sq4, q4)
    assert q4.kld_mean > 0.01  # a real quantization error, measured the same way twice


def test_budget_below_one_block_is_one_line(tmp_path, capsys, monkeypatch):
    """--max-memory below what one unit needs: exit status 1 and one line naming the minimum."""
    from mixquant.cli import main

    folder = make_tiny_llama(tmp_path / "model", vocab_size=320, intermediate_size=128, tie_word_embeddings=False)
    text = tmp_path / "eval.txt"
    text.write_text(random_text(400, 1))
    monkeypatch.setenv("MIXQUANT_CACHE", str(tmp_path / "cache"))
    with Evaluator(folder, text, ctx=32, chunks=2, progress=False) as ev:
        minimum = ev.runtime.min_budget
    capsys.readouterr()
    for command in (["eval", folder, "--plan", "Q8_0"], ["compare", folder, "Q8_0", "Q4_0"]):
        rc = main([str(a) for a in command] + ["--text", str(text), "--ctx", "32", "--chunks", "2",
                                               "--max-memory", str(minimum - 1)])
        err = capsys.readouterr().err
        assert rc == 1 and err.count("\n") == 1 and err.startswith("mixquant: error: "), err
        assert "the minimum is" in err and "--max-memory" in err, err
    with Evaluator(folder, text, ctx=32, chunks=2, progress=False, max_memory=minimum - 1) as ev:
        with pytest.raises(MixquantError, match="the minimum is"):
            ev.reference()
    # at the minimum itself it runs
    assert main(["eval", str(folder), "--plan", "Q8_0", "--text", str(text), "--ctx", "32", "--chunks", "2",
                 "--max-memory", str(minimum)]) == 0


# --- peak memory, in a process of its own --------------------------------------------------------

# Beyond the budget, a streamed eval's process holds what it held before the first forward pass
# (python, torch, transformers, the tokenizer and the token windows: measured in the child as
# `base`, about 450 MB) and, while a unit loads, what its tensors are read from (the file's
# mapped pages, half a float32 unit for bf16), which the runtime's working share (one unit) does
# not cover: measured 60 to 120 MB over the budget here (the 192 MiB embedding and output).
LOAD_OVERHEAD_MB = 200

_CHILD = """
import json, sys
def status(key):
    with open("/proc/self/status") as fh:
        return int(next(line.split()[1] for line in fh if line.startswith(key + ":"))) / 1024
from mixquant.evaluate import Evaluator
folder, text, cache, budget = sys.argv[1:5]
ev = Evaluator(folder, text, ctx=64, chunks=2, threads=1, progress=False, cache=cache, max_memory=int(budget))
rt = ev.runtime
base = status("VmRSS")
ref = ev.reference()
q4 = ev.evaluate_plan("Q4_0")
print(json.dumps({"base": base, "hwm": status("VmHWM"), "resident": rt.resident, "weight_mb": rt.weight_bytes / 2**20,
                  "min_mb": rt.min_budget / 2**20, "ppl": ref.ppl, "kld": q4.kld_mean}))
"""


@pytest.fixture(scope="module")
def larger_llama(tmp_path_factory):
    """A random Llama, 8 layers of hidden size 1024 and the test model's tokenizer (49152 tokens),
    stored in bf16: 0.8 GB in float32, half of it the embedding and the output."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mixquant.testdata import build_test_model

    test_model = build_test_model()
    folder = tmp_path_factory.mktemp("llama-h1024")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(test_model / name, folder / name)
    config = LlamaConfig(vocab_size=49152, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_streamed_eval_keeps_to_the_budget(larger_llama, tmp_path):
    from mixquant.testdata import build_test_text

    _, text = build_test_text()
    budget = 450 * 2**20
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(larger_llama), str(text), str(tmp_path / "cache"), str(budget)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nweights {r['weight_mb']:.0f} MiB in float32, budget {budget / 2**20:.0f} MiB (minimum "
          f"{r['min_mb']:.0f}); before the passes {r['base']:.0f} MiB; peak {r['hwm']:.0f} MiB")
    assert not r["resident"] and r["weight_mb"] > 1.5 * budget / 2**20
    assert math.isfinite(r["ppl"]) and r["kld"] > 0
    assert r["hwm"] - r["base"] < budget / 2**20 + LOAD_OVERHEAD_MB, r
