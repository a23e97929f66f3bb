"""The second bundled test model: Gemma 3 270M (mixquant.testdata.gemma3)."""

import json
import subprocess

import gguf
import numpy as np
import pytest
import torch

from conftest import assert_same_function, assert_same_predictions

from mixquant import formats
from mixquant.testdata import build_gemma_model, build_test_text, degrid, gemma3
from mixquant.testdata.fixture import HEAD_NORMS, hf_name

# --- fast: the transform on a tiny random Gemma 3 -------------------------------------------------


def _tiny_gemma_config():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                            sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                            max_position_embeddings=64, tie_word_embeddings=True)


def test_degrid_preserves_a_tiny_gemma3():
    """Sandwich norms, q/k norms, two rope bases, a sliding window: logits unchanged, weights moved,
    norms over head_dim untouched."""
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(0)
    config = _tiny_gemma_config()
    model = Gemma3ForCausalLM(config).eval()
    rng = np.random.default_rng(1)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    norms = [k for k in state if k.endswith("norm.weight")]
    assert len(norms) == 1 + 2 * 6  # final norm; per layer 4 on the residual and q/k norms
    for k in norms:  # non-trivial norms (HF multiplies by 1 + w), so a wrong permutation would show
        state[k] = rng.uniform(-0.5, 0.5, state[k].shape).astype(np.float32)
    moved = degrid(state, config, seed=0)
    assert moved.keys() == state.keys()
    for i in range(2):
        for norm in HEAD_NORMS:
            name = f"model.layers.{i}.{norm}.weight"
            assert np.array_equal(moved[name], state[name])
        name = f"model.layers.{i}.post_feedforward_layernorm.weight"
        assert not np.array_equal(moved[name], state[name])
        assert np.array_equal(np.sort(moved[name]), np.sort(state[name]))  # permuted

    assert_same_function(Gemma3ForCausalLM, config, state, moved)


# --- slow: the real model (270M parameters, 1.07 GB in float32) -----------------------------------


@pytest.fixture(scope="module")
def gemma_folder():
    return build_gemma_model()


@pytest.fixture(scope="module")
def gguf_reader():
    return gguf.GGUFReader(gemma3.source_gguf())


@pytest.fixture(scope="module")
def untransformed(gguf_reader):
    """The dequantized GGUF weights (norms un-shifted), before the de-gridding transform."""
    return gemma3.MODEL.state_dict(progress=False, reader=gguf_reader)


@pytest.mark.slow
def test_gemma_folder(gemma_folder):
    from safetensors import safe_open

    config = json.loads((gemma_folder / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["model_type"] == "gemma3_text"
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (18, 640, 2048)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 1, 256)
    assert (config["vocab_size"], config["max_position_embeddings"]) == (262144, 32768)
    assert config["sliding_window"] == 512
    assert config["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert config["rope_parameters"]["full_attention"]["rope_theta"] == 1e6
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 1e4
    assert config["query_pre_attn_scalar"] == 256 and config["final_logit_softcapping"] is None
    assert config["rms_norm_eps"] == 1e-6 and config["hidden_activation"] == "gelu_pytorch_tanh"
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 1, 0)
    with safe_open(gemma_folder / "model.safetensors", "np") as f:
        names = set(f.keys())
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [256, 640]
        assert f.get_slice("model.layers.17.post_feedforward_layernorm.weight").get_dtype() == "F32"
        params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in names)
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert len(names) == 2 + 18 * 13
    assert params == 268_098_176
    assert gemma3.terms_of_use().is_file()


@pytest.mark.slow
def test_gemma_tokenizer_matches_llama_cpp(gemma_folder, tmp_path):
    """The folder's tokenizer gives llama.cpp's tokens for the GGUF, on the whole test text."""
    from transformers import AutoTokenizer

    from mixquant.reference import llama_tool

    calib, evaluation = build_test_text()
    text = calib.read_text(encoding="utf-8") + evaluation.read_text(encoding="utf-8")
    sample = tmp_path / "text.txt"
    sample.write_text(text, encoding="utf-8")
    done = subprocess.run([str(llama_tool("llama-tokenize")), "-m", str(gemma3.source_gguf()), "-f", str(sample),
                           "--ids", "--no-bos", "--no-escape", "--log-disable"],
                          capture_output=True, text=True, check=True)
    expected = json.loads(done.stdout.strip())
    tok = AutoTokenizer.from_pretrained(gemma_folder)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(expected) and ids == expected
    assert len(ids) < len(text) / 3  # real merges, not bytes
    assert tok("hi")["input_ids"][0] == 2  # <bos> first, as llama.cpp adds it (tokenizer.ggml.add_bos_token)


def _relative_error(w: np.ndarray, type_name: str) -> float:
    q = formats.dequantize(formats.quantize(w, type_name), type_name, w.shape)
    return float(np.linalg.norm(w - q) / np.linalg.norm(w))


# One tensor on each of the GGUF's grids (Q4_K_M: Q5_0, Q8_0, Q4_K, Q6_K).
_GRID_TENSORS = ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.self_attn.v_proj.weight",
                 "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"]


@pytest.mark.slow
def test_gemma_degridding_breaks_every_grid(gemma_folder, untransformed, gguf_reader):
    """Re-quantized to its own GGUF type, a dequantized weight costs (almost) nothing; de-gridded, it
    costs what an i.i.d. Gaussian matrix of its shape does (within 20%), at its own type and at Q4_0."""
    from safetensors import safe_open

    types = {hf_name(t.name, gemma3.MODEL.block_names): t.tensor_type.name for t in gguf_reader.tensors}
    assert {types[name] for name in _GRID_TENSORS} == {"Q5_0", "Q8_0", "Q4_K", "Q6_K"}
    rng = np.random.default_rng(0)
    with safe_open(gemma_folder / "model.safetensors", "np") as f:
        for name in _GRID_TENSORS:
            before, after = untransformed[name], f.get_tensor(name)
            gaussian = rng.standard_normal(after.shape).astype(np.float32)
            own = types[name]
            on_grid = _relative_error(before, own)
            assert on_grid < 1e-3, (name, own, on_grid)  # Q5_0, Q8_0: exactly 0; k-quants re-fit scales
            for type_name in (own, "Q4_0"):
                ratio = _relative_error(after, type_name) / _relative_error(gaussian, type_name)
                assert 0.8 < ratio < 1.2, (name, type_name, ratio)


@pytest.mark.slow
def test_gemma_transform_preserves_the_model(gemma_folder, untransformed):
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    tok = AutoTokenizer.from_pretrained(gemma_folder)
    text = build_test_text()[0].read_text(encoding="utf-8")[:3000]
    ids = torch.tensor([tok(text)["input_ids"][:256]])
    assert ids.shape[1] == 256

    moved = Gemma3ForCausalLM.from_pretrained(gemma_folder, dtype=torch.float32).eval()
    plain = Gemma3ForCausalLM.from_pretrained(gemma_folder, dtype=torch.float32).eval()
    state = {k: torch.from_numpy(v) for k, v in untransformed.items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    plain.load_state_dict(state, assign=True)  # the untransformed weights, without a copy
    plain.tie_weights()
    # the same function, and the model is the real one (norms un-shifted, q/k not permuted): it predicts Wikipedia text well
    assert_same_predictions(plain, moved, ids)


@pytest.mark.slow
def test_fixture_command_prints_the_gemma_folder(gemma_folder, capsys):
    from mixquant.cli import main

    assert main(["fixture", "--model", "gemma3"]) == 0
    calib, evaluation = build_test_text()
    assert capsys.readouterr().out.splitlines() == [f"test model:       {gemma_folder}",
                                                    f"calibration text: {calib}",
                                                    f"evaluation text:  {evaluation}"]
