"""Hessians H = sum x x^T per linear input: agree with the imatrix and with x captured directly; the file."""

import numpy as np
import pytest
import torch

from mixquant.calibrate import calibrate, imatrix_token_mask, input_of
from mixquant.errors import MixquantError
from mixquant.hessians import Hessians, hessian_bytes

from conftest import make_tiny_llama, random_text

CTX, CHUNKS, BATCH = 68, 3, {"n_batch": 136, "n_ubatch": 48}  # some tokens fall outside the imatrix mask


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_hessians")
    folder = make_tiny_llama(root / "tied", vocab_size=300, intermediate_size=96, tie_word_embeddings=True)
    text = random_text(300, 1)
    cal = calibrate(folder, text, CTX, CHUNKS, progress=False, kv_f16=False, activations=False,
                    output_importance=True, hessians=True, **BATCH)
    return folder, text, cal


def test_one_hessian_per_distinct_input_whose_diagonal_is_the_imatrix(tiny):
    _, _, cal = tiny
    h, im = cal.hessians, cal.imatrix
    assert sorted(h.rows) == sorted([f"blk.{i}.{k}" for i in range(2)
                                     for k in ("attn_in", "attn_output_in", "ffn_in", "ffn_down_in")] + ["output_in"])
    for name in im.names:
        key = input_of(name, tied_output=True)
        assert h.rows[key] == im.counts[name], name
        np.testing.assert_allclose(np.diag(h.matrix(key)) / h.rows[key], im.importance(name), rtol=1e-5, err_msg=name)
    assert h.model == {"arch": "llama", "n_layer": 2, "n_embd": 64}


def test_hessian_is_the_sum_of_outer_products_of_the_masked_inputs(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mixquant.text import token_windows

    folder, text, cal = tiny
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    windows = token_windows(AutoTokenizer.from_pretrained(folder), text, CTX, CHUNKS)
    seen = []
    hook = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).double()))
    with torch.inference_mode():
        for w in windows:
            model(input_ids=w[None])
    hook.remove()
    x = torch.cat(seen).numpy()[imatrix_token_mask(CHUNKS, CTX, **BATCH).reshape(-1)]
    ref = x.T @ x
    scale = np.sqrt(np.outer(np.diag(ref), np.diag(ref)))  # each window's product is float32: relative to this
    assert (np.abs(cal.hessians.matrix("blk.1.ffn_down_in") - ref) <= 1e-5 * scale).all()


def test_file_round_trip_and_bad_files(tiny, tmp_path):
    h = tiny[2].hessians
    path = h.save(tmp_path / "hessians.safetensors")
    assert path.stat().st_size >= hessian_bytes({k: h.cols(k) for k in h.rows})
    back = Hessians.load(path)
    assert back.rows == h.rows and back.model == h.model
    for k in h.rows:
        assert np.array_equal(back.matrix(k), h.matrix(k))
    back.check_model(h.model, "x")
    with pytest.raises(MixquantError, match="another model .*n_embd 64, this model has 576"):
        back.check_model({**h.model, "n_embd": 576}, "x")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MixquantError, match="cut.safetensors"):
        Hessians.load(cut)
    with pytest.raises(MixquantError, match="no such Hessians file"):
        Hessians.load(tmp_path / "missing.safetensors")


def test_over_budget_names_the_size(tiny):
    folder, text, _ = tiny
    with pytest.raises(MixquantError, match=r"Hessians take 0 MiB \(9 inputs.*over the memory budget"):
        calibrate(folder, text, CTX, 1, progress=False, activations=False, output_importance=True,
                  hessians=True, hessian_budget=1000)
