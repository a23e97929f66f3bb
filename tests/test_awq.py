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
from mixquant.cli import main
from mixquant.hessians import Hessians
from mixquant.quantize.awq import AwqScales, ScaledSource, search_scales
from mixquant.source import open_source


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from conftest import tiny_model_and_text

    root = tmp_path_factory.mktemp("tiny_awq")
    model, text = tiny_model_and_text(root, 2000, seed=1)
    hess, imatrix = root / "hessians.safetensors", root / "imatrix.gguf"
    assert main(["imatrix", str(model), "--text", str(text), "--ctx", "64", "-o", str(imatrix),
                 "--hessians", str(hess)]) == 0
    return {"model": model, "text": text, "hessians": hess, "imatrix": imatrix}


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
