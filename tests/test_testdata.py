"""The bundled test model and test text (mixquant.testdata)."""

import json
import re

import gguf
import numpy as np
import pytest
import torch

from conftest import assert_same_function, assert_same_predictions

from mixquant import testdata


# --- fast unit tests ------------------------------------------------------------------------------


def _llama_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim but for numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head,n_head_kv,rows", [(9, 9, 576), (9, 3, 192), (4, None, 32)])
def test_unpermute_inverts_llama_permute(n_head, n_head_kv, rows):
    w = np.random.default_rng(0).standard_normal((rows, 8)).astype(np.float32)
    heads = n_head_kv or n_head
    assert np.array_equal(testdata.unpermute(_llama_permute(w, n_head, n_head_kv), heads), w)


def _tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                       tie_word_embeddings=True, max_position_embeddings=64)


def test_degrid_preserves_a_tiny_gqa_model():
    """Every transform is exact in arithmetic: logits agree to float32 rounding, weights move."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = _tiny_config()
    model = LlamaForCausalLM(config).eval()
    rng = np.random.default_rng(1)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for k in state:
        if k.endswith("norm.weight"):  # non-trivial norms, so a wrong permutation would show
            state[k] = rng.uniform(0.5, 1.5, state[k].shape).astype(np.float32)
    moved = testdata.degrid(state, config, seed=0)
    assert moved.keys() == state.keys()
    assert all(moved[k].dtype == np.float32 and moved[k].shape == state[k].shape for k in state)
    v = "model.layers.0.self_attn.v_proj.weight"
    assert not np.allclose(moved[v], state[v])

    assert_same_function(LlamaForCausalLM, config, state, moved)
    # the same seed gives the same transform
    again = testdata.degrid(state, config, seed=0)
    assert all(np.array_equal(again[k], moved[k]) for k in moved)


def test_filter_wiki_strips_markup_like_gensim():
    raw = ("'''Anarchism''' is a [[political philosophy|philosophy]]{{cite|x={{y}}}} that<ref name=a>note</ref> "
           "advocates [[Self-governance|self-governed]] [http://example.org societies] &amp;c.<!-- comment -->\n"
           "[[Category:Anarchism]]")
    # gensim keeps the space before an external link's description
    assert testdata.filter_wiki(raw) == "'''Anarchism''' is a philosophy that advocates self-governed  societies &c.\n"


def test_clean_wiki_text_headings_and_quotes():
    text = "Intro with '''bold''' and ''italic''.\n\n\n\n==History==\nOld.\n=== Early days ===\nVery old.\n"
    assert testdata.clean_wiki_text("Title", text) == (
        "= Title =\n\nIntro with bold and italic.\n\n= = History = =\nOld.\n= = = Early days = = =\nVery old.\n")


# --- the test text --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def text_split():
    return testdata.build_test_text()


def test_text_split_is_disjoint_and_60_40(text_split):
    calib_path, eval_path = text_split
    calib = calib_path.read_text(encoding="utf-8")
    evaluation = eval_path.read_text(encoding="utf-8")
    full = testdata.cleaned_text()
    assert calib + evaluation == full  # a clean cut: nothing shared, nothing lost
    assert len(calib) == len(full) * 3 // 5
    assert abs(len(full) - 3_086_012) < 5_000  # the anchors' extract: 3,086,012 characters
    assert calib.startswith("= Anarchism =\n\n")
    assert len(re.findall(r"^= [^=\n]+ =$", full, re.M)) == 106  # one `= Title =` per article
    assert re.search(r"^= = \S.* = =$", full, re.M)  # section headings, spaced
    assert not re.search(r"^==", full, re.M)  # none left unspaced
    assert "''" not in full  # bold/italic quotes removed
    assert "[[" not in full and "{{" not in full and "<ref" not in full


def test_text_build_is_cached(text_split):
    calib, _ = text_split
    mtime = calib.stat().st_mtime_ns
    assert testdata.build_test_text() == text_split
    assert calib.stat().st_mtime_ns == mtime


# --- the test model (slow: 135M parameters) -------------------------------------------------------


@pytest.fixture(scope="session")
def model_folder():
    return testdata.build_test_model()


@pytest.fixture(scope="session")
def untransformed():
    """The dequantized GGUF weights (q/k un-permuted), before the de-gridding transform."""
    return testdata.read_gguf_state_dict(progress=False)


@pytest.mark.slow
def test_model_folder(model_folder):
    from safetensors import safe_open

    config = json.loads((model_folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert (config["vocab_size"], config["max_position_embeddings"]) == (49152, 8192)
    assert config["rms_norm_eps"] == 1e-5 and config["rope_parameters"]["rope_theta"] == 100000.0
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    with safe_open(model_folder / "model.safetensors", "np") as f:
        names = set(f.keys())
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
        assert f.get_slice("model.layers.29.mlp.down_proj.weight").get_dtype() == "F32"
        params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in names)
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names and "lm_head.weight" not in names
    assert len(names) == 2 + 30 * 9
    assert params == 134_515_008  # as in the anchors


@pytest.mark.slow
def test_tokenizer(model_folder, text_split):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_folder)
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    assert model["type"] == "BPE" and len(model["merges"]) == 48900
    assert len(tok) == 49152
    reader = gguf.GGUFReader(testdata.source_gguf())
    assert tok.chat_template == reader.fields["tokenizer.chat_template"].contents()
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    text = text_split[0].read_text(encoding="utf-8")[:20000]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 3  # real merges, not bytes
    assert tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"][0] == 1
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat.startswith("<|im_start|>system\n") and "<|im_start|>user\nhi<|im_end|>" in chat
    # llama.cpp's "smollm" pre-tokenizer splits digits off first, so spaces before them merge
    ids = tok("Press,  2004", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[-5:] == ["ĠĠ", "2", "0", "0", "4"]


@pytest.mark.slow
def test_tokenizer_matches_llama_cpp(model_folder, text_split, tmp_path):
    """The folder's tokenizer gives llama.cpp's tokens for the GGUF, on the whole test text."""
    import subprocess

    from transformers import AutoTokenizer

    from mixquant.reference import llama_tool

    text = text_split[0].read_text(encoding="utf-8") + text_split[1].read_text(encoding="utf-8")
    sample = tmp_path / "text.txt"
    sample.write_text(text, encoding="utf-8")
    done = subprocess.run([str(llama_tool("llama-tokenize")), "-m", str(testdata.source_gguf()), "-f", str(sample),
                           "--ids", "--no-bos", "--no-escape", "--log-disable"],
                          capture_output=True, text=True, check=True)
    expected = json.loads(done.stdout.strip())
    ids = AutoTokenizer.from_pretrained(model_folder)(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(expected) and ids == expected


def _relative_q4_1_error(w: np.ndarray) -> float:
    q = gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1), gguf.GGMLQuantizationType.Q4_1)
    return float(np.linalg.norm(w - q) / np.linalg.norm(w))


@pytest.mark.slow
def test_degridding_breaks_the_q4_1_grid(model_folder, untransformed):
    from safetensors import safe_open

    name = "model.layers.0.mlp.gate_proj.weight"
    with safe_open(model_folder / "model.safetensors", "np") as f:
        moved = f.get_tensor(name)
    before, after = _relative_q4_1_error(untransformed[name]), _relative_q4_1_error(moved)
    assert before < 1e-6, before  # the dequantized GGUF sits on the Q4_1 grid
    assert after > 0.05, after  # the transformed one is an honest test


@pytest.mark.slow
def test_transform_preserves_the_model(model_folder, untransformed, text_split):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_folder)
    text = text_split[0].read_text(encoding="utf-8")[:3000]
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:256]])
    assert ids.shape[1] == 256

    moved = LlamaForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()
    plain = LlamaForCausalLM(moved.config).eval()
    state = {k: torch.from_numpy(v) for k, v in untransformed.items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    plain.load_state_dict(state)
    # the same function, and the model is the real one: q/k un-permuted right, so it predicts Wikipedia text well
    assert_same_predictions(plain, moved, ids)
