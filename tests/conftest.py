"""Shared fixtures: the reference ggml oracle and the tensor distributions every codec is checked on."""

import numpy as np
import pytest

from mixquant.reference import ggml as _ggml


@pytest.fixture(scope="session")
def ggml():
    """ggml-base from the vendored llama.cpp, called through ctypes."""
    return _ggml()


def tensor_cases(cols: int = 512, rows: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Random (rows, cols) float32 matrices of the shapes of trouble ggml meets in real models."""
    rng = np.random.default_rng(seed)
    gauss = rng.standard_normal((rows, cols))
    heavy = rng.standard_t(2, (rows, cols))
    outliers = gauss.copy()
    outliers.flat[rng.choice(outliers.size, outliers.size // 100, replace=False)] *= 50
    blocks = gauss.copy()
    blocks[:, :64] = 0.0  # all-zero blocks
    blocks[:, 64:128] = 0.37  # constant blocks
    blocks[:, 128:160] = -2.5
    blocks[1] = 0.0  # an all-zero row
    mixed_sign = np.abs(gauss) * (rng.random((rows, cols)) < 0.5)  # non-negative, many exact zeros
    cases = {
        "gaussian": gauss,
        "heavy_tailed": heavy,
        "outliers": outliers,
        "zero_and_constant_blocks": blocks,
        "non_negative_sparse": mixed_sign,
        "tiny": gauss * 1e-6,
        "huge": gauss * 1e4,
        "uniform": rng.uniform(-1, 1, (rows, cols)),
    }
    return {name: np.ascontiguousarray(x, dtype=np.float32) for name, x in cases.items()}


def importance_cases(cols: int = 512, seed: int = 1) -> dict[str, np.ndarray | None]:
    """Importance vectors like llama-imatrix produces: positive, spread over orders of magnitude."""
    rng = np.random.default_rng(seed)
    return {
        "none": None,
        "lognormal": np.exp(rng.normal(0, 2, cols)).astype(np.float32),
        "with_zeros": np.where(rng.random(cols) < 0.2, 0, rng.random(cols)).astype(np.float32),
    }


_WORDS = ("the cat dog sat on a mat and ran to house tree river stone quickly slowly red blue green "
          "bird fish over under near far big small old new day night sun moon").split()


def random_text(n_words: int, seed: int) -> str:
    """Sentences of random common words: text a tiny BPE tokenizer can be trained and run on."""
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(_WORDS, 12)).capitalize() + "." for _ in range(n_words // 12)) + "\n"


def make_tiny_llama(folder, *, vocab_size: int, intermediate_size: int, tie_word_embeddings: bool):
    """A random 2-layer GQA llama with its own byte-level BPE tokenizer, saved as an HF folder.

    Norm weights are non-trivial, so a wrong permutation or name mapping would show."""
    import json

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([random_text(3000, 0)], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "model_max_length": 4096}))
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=intermediate_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         rms_norm_eps=1e-5, tie_word_embeddings=tie_word_embeddings, max_position_embeddings=256,
                         initializer_range=0.15, bos_token_id=None, eos_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return folder


def tiny_model_and_text(root, n_words: int, seed: int):
    """(HF folder, calibration text file) under `root`: a tied tiny llama and random sentences."""
    model = make_tiny_llama(root / "model", vocab_size=300, intermediate_size=256, tie_word_embeddings=True)
    text = root / "calib.txt"
    text.write_text(random_text(n_words, seed))
    return model, text


def assert_same_function(model_cls, config, state: dict, moved: dict) -> None:
    """A function-preserving transform: the model built from `moved` gives the logits of the one
    built from `state` (HF state dicts without the tied lm_head) on 40 tokens."""
    import torch

    def logits(sd):
        m = model_cls(config).eval()
        m.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
        m.tie_weights()
        with torch.no_grad():
            return m(torch.arange(40).remainder(config.vocab_size)[None]).logits.double()

    a, b = logits(state), logits(moved)
    assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()


def assert_same_predictions(plain, moved, ids) -> None:
    """Two real models that must compute the same function: mean KL < 1e-8 between their next-token
    distributions on `ids` (1, n), and the first one predicts that text well (perplexity < 40)."""
    import torch

    with torch.no_grad():
        p = plain(ids).logits.double().log_softmax(-1)[0]
        q = moved(ids).logits.double().log_softmax(-1)[0]
    kl = (p.exp() * (p - q)).sum(-1)
    assert kl.mean().item() < 1e-8, kl.mean().item()
    nll = -p[:-1].gather(-1, ids[0, 1:, None]).mean().item()
    assert np.exp(nll) < 40, np.exp(nll)


def gguf_file_bytes(w, path) -> bytes:
    """Write the GGUFWriter `w` (opened on `path`) out whole and return the file's bytes."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.fixture(scope="session")
def tiny_calibrated(tmp_path_factory) -> dict:
    """The tiny tied llama (2,000 words of text, seed 1) with its imatrix and Hessians from
    `mixquant imatrix --hessians` (64-token windows): the inputs of the GPTQ and AWQ tests."""
    from mixquant.cli import main

    root = tmp_path_factory.mktemp("tiny_calibrated")
    model, text = tiny_model_and_text(root, 2000, seed=1)
    hess, imatrix = root / "hessians.safetensors", root / "imatrix.gguf"
    assert main(["imatrix", str(model), "--text", str(text), "--ctx", "64", "-o", str(imatrix),
                 "--hessians", str(hess)]) == 0
    return {"model": model, "text": text, "hessians": hess, "imatrix": imatrix}


def run_quantize(capsys, *args) -> tuple[int, str]:
    """`mixquant quantize ARGS`: (exit status, what it wrote to stderr)."""
    from mixquant.cli import main

    rc = main(["quantize", *map(str, args)])
    return rc, capsys.readouterr().err

