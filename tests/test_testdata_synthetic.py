"""Synthetic Llama folders (mixquant.testdata.synthetic): a tiny one, a few MB, built per test session."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from mixquant import formats
from mixquant.cli import main
from mixquant.testdata import build_test_text
from mixquant.testdata.synthetic import SyntheticShape, build_synthetic_llama, synthetic_shape

TINY = dict(hidden=64, n_layer=2, ff=128, n_head=2, n_head_kv=1)
SHARD_BYTES = 2_000_000  # the two 49,152 x 64 bf16 matrices (6.3 MB each) get a file each, the blocks one


def _digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_synthetic_llama(tmp_path_factory.mktemp("synthetic") / "tiny", **TINY, shard_bytes=SHARD_BYTES)


def test_shards_and_index_agree(tiny):
    from safetensors import safe_open

    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in tiny.glob("*.safetensors"))
    assert files == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors"]
    assert sorted(set(index["weight_map"].values())) == files
    expected = dict(SyntheticShape(**TINY).tensors())
    assert index["weight_map"].keys() == expected.keys()
    total = 0
    for file in files:
        with safe_open(tiny / file, framework="pt") as fh:
            assert set(fh.keys()) == {n for n, f in index["weight_map"].items() if f == file}
            for name in fh.keys():
                t = fh.get_tensor(name)
                assert t.dtype == torch.bfloat16 and tuple(t.shape) == expected[name]
                total += t.numel() * 2
    assert index["metadata"]["total_size"] == total
    assert index["metadata"]["total_parameters"] == SyntheticShape(**TINY).parameters
    config = json.loads((tiny / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and not config["tie_word_embeddings"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (64, 2, 128)


def test_transformers_runs_it_sanely(tiny):
    """Finite logits and a loss near that of a uniform guess (ln 49152 = 10.8) on the bundled text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32, use_safetensors=True,
                                                 local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny, local_files_only=True)
    _, eval_text = build_test_text()
    ids = tokenizer(eval_text.read_text()[:4000], return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert torch.isfinite(out.logits).all()
    assert 0.3 < out.logits.std() < 3
    assert math.log(49152) - 1 < out.loss < math.log(49152) + 3
    # the residual writers are scaled down: the stream stays O(1) through the blocks
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    assert all(0.3 < h.std() < 3 for h in hidden[:-1])


def test_same_seed_same_bytes(tiny, tmp_path):
    again = build_synthetic_llama(tmp_path / "again", **TINY, shard_bytes=SHARD_BYTES)
    assert _digests(again) == _digests(tiny)
    other = build_synthetic_llama(tmp_path / "other", **TINY, shard_bytes=SHARD_BYTES, seed=1)
    assert _digests(other)["model-00002-of-00003.safetensors"] != _digests(tiny)["model-00002-of-00003.safetensors"]


def test_mixquant_reads_and_quantizes_it(tiny, tmp_path):
    from gguf import GGUFReader

    from mixquant.source import open_source

    out = tmp_path / "tiny-q8_0.gguf"
    assert main(["quantize", str(tiny), str(out), "Q8_0"]) == 0
    written = {t.name: t for t in GGUFReader(out).tensors}
    with open_source(tiny) as source:
        assert source.model.arch == "llama" and source.model.n_layer == 2
        assert {t.name for t in source.model.tensors} == set(written)
        for name in ("blk.1.ffn_down.weight", "output.weight"):
            assert written[name].tensor_type.name == "Q8_0"
            expected = formats.quantize(source.tensor(name), "Q8_0")
            assert bytes(np.asarray(written[name].data).view(np.uint8)) == expected


@pytest.mark.parametrize("gb", [0.5, 1.5, 3.0])
def test_shape_for_a_float32_size(gb):
    shape = synthetic_shape(gb)
    assert abs(shape.float32_bytes / (gb * 1e9) - 1) < 0.1
    assert shape.n_layer >= 8 and shape.hidden % 256 == 0 and shape.ff % 256 == 0
    assert shape.hidden == shape.n_head * 64 and shape.n_head == 4 * shape.n_head_kv

