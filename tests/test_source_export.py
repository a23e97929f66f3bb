"""Reading checkpoints (mixquant.source) and writing GGUF files (mixquant.export).

Fast tests build tiny random Hugging Face models (2 layers, hidden 64) with the SmolLM2 tokenizer;
the slow ones use the real test model and llama.cpp's own converter and tools.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")

from mixquant import export as export_mod  # noqa: E402
from mixquant.errors import MixquantError  # noqa: E402
from mixquant.export import file_type_for, write_gguf  # noqa: E402
from mixquant.plan import preset_plan  # noqa: E402
from mixquant.source import GGUFSource, HFSource, open_source, permute_qk  # noqa: E402

N_LAYER, N_EMBD, N_FF, N_HEAD, N_HEAD_KV, VOCAB = 2, 64, 128, 4, 2, 49152


# --------------------------------------------------------------------------------------------
# fixtures: tiny random models


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """tokenizer.json / tokenizer_config.json / chat template of SmolLM2, saved once."""
    out = tmp_path_factory.mktemp("tokenizer")
    from mixquant.cache import cache_dir

    built = cache_dir() / "smollm2-135m"
    if (built / "tokenizer.json").is_file():
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (built / f).is_file():
                shutil.copy(built / f, out / f)
        return out
    from transformers import AutoTokenizer

    from mixquant.testdata import GGUF_NAME, source_gguf

    tok = AutoTokenizer.from_pretrained(source_gguf().parent, gguf_file=GGUF_NAME)
    tok.save_pretrained(out)
    return out


def _tiny_model(folder: Path, tokenizer_dir: Path, arch: str = "llama", dtype=None, shard: bool = False,
                tied: bool = True, seed: int = 0, **extra) -> Path:
    import transformers

    classes = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    }
    cfg_cls, model_cls = (getattr(transformers, n) for n in classes[arch])
    torch.manual_seed(seed)
    cfg = cfg_cls(hidden_size=N_EMBD, intermediate_size=N_FF, num_hidden_layers=N_LAYER,
                  num_attention_heads=N_HEAD, num_key_value_heads=N_HEAD_KV, vocab_size=VOCAB,
                  max_position_embeddings=2048, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, **extra)
    model = model_cls(cfg)
    with torch.no_grad():  # norms at 1.0 would hide a mix-up between them
        for _name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, max_shard_size="4MB" if shard else "50GB")
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    return _tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_src(tiny_llama):
    """The tiny llama opened once (its metadata, which loads the tokenizer, is then cached)."""
    src = open_source(tiny_llama)
    assert src.metadata
    return src


@pytest.fixture
def tiny_copy(tmp_path, tiny_llama) -> Path:
    """A private copy of the tiny llama, to damage."""
    return Path(shutil.copytree(tiny_llama, tmp_path / "model"))


def _hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _reader_tensors(path: Path) -> dict[str, np.ndarray]:
    r = gguf.GGUFReader(path)
    return {t.name: np.array(t.data) for t in r.tensors}


def _f32_plan(src):
    return preset_plan(src.model, "F32")


# --------------------------------------------------------------------------------------------
# Hugging Face -> GGUF round trips


CASES = {
    "llama-f32": dict(arch="llama"),
    "llama-f16": dict(arch="llama", dtype=torch.float16),
    "llama-bf16": dict(arch="llama", dtype=torch.bfloat16),
    "llama-bf16-sharded-untied": dict(arch="llama", dtype=torch.bfloat16, shard=True, tied=False),
    "mistral-f16": dict(arch="mistral", dtype=torch.float16, tied=False),
    "qwen2-bf16": dict(arch="qwen2", dtype=torch.bfloat16),
    "qwen3-f32-untied": dict(arch="qwen3", tied=False, head_dim=32),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hf_round_trip_through_f32_gguf(case, tmp_path, tokenizer_dir):
    spec = CASES[case]
    folder = _tiny_model(tmp_path / case, tokenizer_dir, **spec)
    if spec.get("shard"):
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("*.safetensors"))) > 1
    hf = _hf_weights(folder)
    src = open_source(folder)
    assert isinstance(src, HFSource) and src.hf_folder == folder
    arch = {"mistral": "llama"}.get(spec["arch"], spec["arch"])
    m = src.model
    assert (m.arch, m.n_layer, m.n_head, m.n_head_kv, m.n_embd, m.n_expert) == (arch, N_LAYER, N_HEAD, N_HEAD_KV, N_EMBD, 0)
    tied = spec.get("tied", True)
    assert m.tied_output is tied
    assert ("output.weight" in src.tensor_names) is (not tied)

    # every tensor: float32 in GGUF orientation, equal to the checkpoint's (after the q/k permutation)
    for t in m.tensors:
        x = src.tensor(t.name)
        assert x.dtype == np.float32 and x.flags.c_contiguous and x.shape == t.shape
    q_hf = hf["model.layers.1.self_attn.q_proj.weight"].float().numpy()
    k_hf = hf["model.layers.1.self_attn.k_proj.weight"].float().numpy()
    if arch == "llama":
        assert np.array_equal(src.tensor("blk.1.attn_q.weight"), permute_qk(q_hf, N_HEAD, N_HEAD))
        assert np.array_equal(src.tensor("blk.1.attn_k.weight"), permute_qk(k_hf, N_HEAD, N_HEAD_KV))
    else:  # no permutation for Qwen
        assert np.array_equal(src.tensor("blk.1.attn_q.weight"), q_hf)
        assert np.array_equal(src.tensor("blk.1.attn_k.weight"), k_hf)
    assert np.array_equal(src.tensor("blk.0.ffn_down.weight"), hf["model.layers.0.mlp.down_proj.weight"].float().numpy())
    assert np.array_equal(src.tensor("token_embd.weight"), hf["model.embed_tokens.weight"].float().numpy())
    if arch == "qwen2":
        assert np.array_equal(src.tensor("blk.0.attn_v.bias"), hf["model.layers.0.self_attn.v_proj.bias"].float().numpy())
    if arch == "qwen3":
        assert np.array_equal(src.tensor("blk.0.attn_q_norm.weight"),
                              hf["model.layers.0.self_attn.q_norm.weight"].float().numpy())

    out = tmp_path / "out.gguf"
    result = write_gguf(src, _f32_plan(src), out, progress=False)
    assert result.path == out and result.bytes == out.stat().st_size
    assert result.n_tensors == len(m.tensors) and result.type_counts == {"F32": len(m.tensors)}
    assert result.file_type == int(gguf.LlamaFileType.ALL_F32)

    # read back with gguf's own reader ...
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields[f"{arch}.block_count"].contents() == N_LAYER
    assert reader.fields["general.file_type"].contents() == 0
    back = {t.name: t for t in reader.tensors}
    assert list(back) == src.tensor_names
    for t in m.tensors:
        rt = back[t.name]
        assert rt.tensor_type == gguf.GGMLQuantizationType.F32
        assert tuple(reversed(rt.shape.tolist())) == t.shape
        assert np.array_equal(np.asarray(rt.data), src.tensor(t.name)), t.name

    # ... and with open_source
    g = open_source(out)
    assert isinstance(g, GGUFSource) and g.hf_folder is None
    assert (g.model.arch, g.model.n_layer, g.model.n_head, g.model.n_head_kv, g.model.n_embd, g.model.tied_output) == \
        (m.arch, m.n_layer, m.n_head, m.n_head_kv, m.n_embd, m.tied_output)
    assert [(t.name, t.shape) for t in g.model.tensors] == [(t.name, t.shape) for t in m.tensors]
    for name in src.tensor_names:
        assert np.array_equal(g.tensor(name), src.tensor(name))
    assert list(g.metadata) == list(src.metadata)
    for key, val in src.metadata.items():
        assert g.metadata[key].type == val.type, key
        if val.type == gguf.GGUFValueType.FLOAT32:  # float32 in the file
            assert g.metadata[key].value == pytest.approx(val.value, rel=1e-7), key
        else:
            assert g.metadata[key].value == val.value, key


def test_permutation_matches_convert_hf_to_gguf_and_rope_pairs():
    """LlamaModel.permute (written here with torch, as in convert_hf_to_gguf.py) and its meaning."""

    def convert_permute(weights, n_head, n_head_kv):
        if n_head_kv is not None and n_head != n_head_kv:
            n_head = n_head_kv
        return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
                .swapaxes(1, 2).reshape(weights.shape))

    rng = np.random.default_rng(0)
    for n_head, n_kv, rows in ((4, 4, 64), (4, 2, 32), (9, 3, 192)):
        w = rng.standard_normal((rows, 24)).astype(np.float32)
        ours = permute_qk(w, n_head, n_kv)
        assert np.array_equal(ours, convert_permute(torch.from_numpy(w), n_head, n_kv).numpy())
        # ggml's rope rotates rows (2j, 2j+1) of a head; HF rotates (j, j + d/2)
        heads = n_kv if n_kv != n_head else n_head
        d = rows // heads
        for h in range(heads):
            for j in range(d // 2):
                assert np.array_equal(ours[h * d + 2 * j], w[h * d + j])
                assert np.array_equal(ours[h * d + 2 * j + 1], w[h * d + d // 2 + j])
        b = rng.standard_normal(rows).astype(np.float32)  # biases permute the same way
        assert np.array_equal(permute_qk(b, n_head, n_kv), convert_permute(torch.from_numpy(b), n_head, n_kv).numpy())


def test_bf16_is_widened_exactly(tmp_path, tokenizer_dir):
    folder = _tiny_model(tmp_path / "bf16", tokenizer_dir, dtype=torch.bfloat16)
    hf = _hf_weights(folder)
    src = open_source(folder)
    assert src.source_type("blk.0.ffn_up.weight") == "BF16"
    assert {t.dtype for t in src.model.tensors if len(t.shape) == 1} == {"F32"}  # convert keeps norms F32
    assert {t.dtype for t in src.model.tensors if len(t.shape) == 2} == {"BF16"}
    assert np.array_equal(src.tensor("blk.0.ffn_up.weight"), hf["model.layers.0.mlp.up_proj.weight"].float().numpy())


def test_metadata_as_convert_hf_to_gguf_writes_it(tiny_src):
    src = tiny_src
    md = src.metadata
    expect = {
        "general.type": "model",
        "llama.block_count": N_LAYER,
        "llama.context_length": 2048,
        "llama.embedding_length": N_EMBD,
        "llama.feed_forward_length": N_FF,
        "llama.attention.head_count": N_HEAD,
        "llama.attention.head_count_kv": N_HEAD_KV,
        "llama.vocab_size": VOCAB,
        "llama.rope.dimension_count": N_EMBD // N_HEAD,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,  # convert's rule for 49152-token vocabularies
    }
    for key, value in expect.items():
        assert src.meta(key) == value, key
    assert src.meta("llama.rope.freq_base") == pytest.approx(10000.0)
    assert src.meta("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert len(src.meta("tokenizer.ggml.tokens")) == VOCAB
    assert len(src.meta("tokenizer.ggml.token_type")) == VOCAB
    assert src.meta("tokenizer.ggml.tokens")[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert int(src.meta("tokenizer.ggml.token_type")[1]) == gguf.TokenType.CONTROL
    assert len(src.meta("tokenizer.ggml.merges")) > 40000
    assert "<|im_start|>" in src.meta("tokenizer.chat_template")
    for key in ("general.architecture", "general.file_type", "general.quantization_version"):
        assert key not in md  # the writer's


def test_llama3_rope_freqs_tensor(tmp_path, tokenizer_dir):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256, "rope_theta": 500000.0}
    folder = _tiny_model(tmp_path / "l3", tokenizer_dir, rope_parameters=rope)
    src = open_source(folder)
    f = src.tensor("rope_freqs.weight")
    assert f.shape == (N_EMBD // N_HEAD // 2,) and f.dtype == np.float32
    assert f.min() >= 1.0 and f.max() == pytest.approx(8.0)
    assert src.meta("llama.rope.freq_base") == pytest.approx(500000.0)


# --------------------------------------------------------------------------------------------
# quantized output, GGUF input, requantization


def test_q8_0_export_and_gguf_requantize_guard(tiny_src, tmp_path):
    src = tiny_src
    plan = preset_plan(src.model, "Q8_0")
    out = tmp_path / "q8.gguf"
    result = write_gguf(src, plan, out, progress=False, threads=2, name="Tiny Q8",
                        extra_metadata={"quantize.imatrix.file": "imatrix.gguf", "quantize.imatrix.entries_count": 14})
    assert result.file_type == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    r = gguf.GGUFReader(out)
    assert r.fields["general.name"].contents() == "Tiny Q8"
    assert r.fields["quantize.imatrix.file"].contents() == "imatrix.gguf"
    assert r.fields["quantize.imatrix.entries_count"].types == [gguf.GGUFValueType.INT32]
    assert r.fields["general.quantization_version"].contents() == gguf.GGML_QUANT_VERSION
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types == {n: plan.types[n] for n in src.tensor_names}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.ffn_up.weight"] == "Q8_0"

    with pytest.raises(MixquantError, match=r"q8\.gguf.*already quantized \(Q8_0\).*allow_requantize"):
        open_source(out)
    with pytest.warns(UserWarning, match="requantizing"):
        g = open_source(out, allow_requantize=True)
    assert g.source_type("blk.0.ffn_up.weight") == "Q8_0"
    x, ref = g.tensor("blk.0.ffn_up.weight"), src.tensor("blk.0.ffn_up.weight")
    assert x.shape == ref.shape and np.abs(x - ref).max() <= np.abs(ref).max() / 100
    # a tensor whose type does not change is copied; Q8_0 also re-encodes to the same bytes
    out2 = tmp_path / "q8-again.gguf"
    write_gguf(g, preset_plan(g.model, "Q8_0"), out2, progress=False)
    first, again = _reader_tensors(out), _reader_tensors(out2)
    assert first.keys() == again.keys()
    for name, data in first.items():
        assert np.array_equal(again[name], data), name
        if first[name].dtype == np.uint8:
            from mixquant import formats

            x = g.tensor(name)
            assert formats.quantize(x.reshape(-1, x.shape[-1]), "Q8_0") == data.tobytes(), name
    # requantizing to another type goes through the dequantized values
    out3 = tmp_path / "q4.gguf"
    write_gguf(g, preset_plan(g.model, "Q4_0"), out3, progress=False)
    q4 = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out3).tensors}
    assert q4["blk.0.ffn_up.weight"] == "Q4_0" and q4["blk.0.attn_norm.weight"] == "F32"


def test_f16_and_bf16_gguf_sources_read_exactly(tiny_src, tmp_path):
    src = tiny_src
    for preset in ("F16", "BF16"):
        out = tmp_path / f"{preset}.gguf"
        write_gguf(src, preset_plan(src.model, preset), out, progress=False)
        g = open_source(out)  # float types are not "quantized": no flag needed
        x = g.tensor("blk.1.ffn_gate.weight")
        ref = torch.from_numpy(src.tensor("blk.1.ffn_gate.weight"))
        want = ref.to(torch.float16 if preset == "F16" else torch.bfloat16).float().numpy()
        assert np.array_equal(x, want)
        assert g.source_type("blk.1.ffn_gate.weight") == preset


def test_importance_vectors_reach_the_quantizer(tiny_src, tmp_path, monkeypatch):
    src = tiny_src
    plan = preset_plan(src.model, "Q4_0")
    importance = {t.name: np.random.default_rng(1).random(t.shape[-1]).astype(np.float32)
                  for t in src.model.tensors if plan.types[t.name] == "Q4_0"}
    seen = {}
    real = export_mod.formats.quantize

    def spy(x, type_name, importance=None, threads=1):
        seen[x.shape, type_name, None if importance is None else importance.tobytes()] = True
        return real(x, type_name, importance=importance, threads=threads)

    monkeypatch.setattr(export_mod.formats, "quantize", spy)
    write_gguf(src, plan, tmp_path / "imp.gguf", importance=importance, progress=False)
    for name, vec in importance.items():
        assert (src.shape(name), "Q4_0", vec.tobytes()) in seen, name

    bad = {"blk.0.ffn_up.weight": np.ones(3, np.float32)}
    with pytest.raises(MixquantError, match=r"blk\.0\.ffn_up\.weight.*importance"):
        write_gguf(src, plan, tmp_path / "bad.gguf", importance=bad, progress=False)
    assert not (tmp_path / "bad.gguf").exists()


def test_file_type():
    shapes = {"a.weight": (64, 64), "b.weight": (64, 256), "n.weight": (64,)}
    assert file_type_for({"a.weight": "F32", "b.weight": "F32", "n.weight": "F32"}, shapes) == 0
    assert file_type_for({"a.weight": "F16", "b.weight": "F16", "n.weight": "F32"}, shapes) == 1
    assert file_type_for({"a.weight": "Q8_0", "b.weight": "Q8_0", "n.weight": "F32"}, shapes) == 7
    assert file_type_for({"a.weight": "Q6_K", "b.weight": "Q4_K", "n.weight": "F32"}, shapes) == 15
    assert file_type_for({}, {}, preset="Q4_K_S") == 14
    assert file_type_for({}, {}, preset="F32") == 0


# --------------------------------------------------------------------------------------------
# streaming, atomic output, never overwrite the input


def test_export_streams_one_tensor_at_a_time(tiny_src, tmp_path, monkeypatch):
    src = tiny_src
    events = []
    real_tensor, real_quantize = src.tensor, export_mod.formats.quantize
    monkeypatch.setattr(src, "tensor", lambda name: events.append(("read", name)) or real_tensor(name))
    monkeypatch.setattr(export_mod.formats, "quantize",
                        lambda x, t, importance=None, threads=1: events.append(("quantize",)) or
                        real_quantize(x, t, importance=importance, threads=threads))
    write_gguf(src, _f32_plan(src), tmp_path / "s.gguf", progress=False)
    assert events == [e for name in src.tensor_names for e in (("read", name), ("quantize",))]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_interrupted_export_leaves_no_file(tiny_src, tmp_path, monkeypatch, exc):
    src = tiny_src
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "model.gguf"
    real = export_mod.formats.quantize
    calls = []

    def failing(x, type_name, importance=None, threads=1):
        calls.append(1)
        if len(calls) == 5:
            raise exc
        return real(x, type_name, importance=importance, threads=threads)

    monkeypatch.setattr(export_mod.formats, "quantize", failing)
    with pytest.raises(type(exc)):
        write_gguf(src, _f32_plan(src), out, progress=False)
    assert list(out_dir.iterdir()) == []

    # an existing file is left as it was
    out.write_bytes(b"previous")
    calls.clear()
    with pytest.raises(type(exc)):
        write_gguf(src, _f32_plan(src), out, progress=False)
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.gguf"] and out.read_bytes() == b"previous"


def test_export_refuses_to_overwrite_its_input(tiny_src, tmp_path, tiny_llama):
    src = tiny_src
    out = tmp_path / "f32.gguf"
    write_gguf(src, _f32_plan(src), out, progress=False)
    g = open_source(out)
    before = out.read_bytes()
    with pytest.raises(MixquantError, match="overwrite the input"):
        write_gguf(g, _f32_plan(g), out, progress=False)
    link = tmp_path / "link.gguf"
    link.symlink_to(out)
    with pytest.raises(MixquantError, match="overwrite the input"):
        write_gguf(g, _f32_plan(g), link, progress=False)
    with pytest.raises(MixquantError, match="overwrite the input"):
        write_gguf(src, _f32_plan(src), tiny_llama / "model.safetensors", progress=False)
    assert out.read_bytes() == before


def test_plan_must_fit_the_model(tiny_src, tmp_path):
    src = tiny_src
    plan = _f32_plan(src)
    del plan.types["blk.1.ffn_up.weight"]
    with pytest.raises(MixquantError, match=r"no type for tensors blk\.1\.ffn_up\.weight"):
        write_gguf(src, plan, tmp_path / "x.gguf", progress=False)
    plan = _f32_plan(src)
    plan.types["blk.0.ffn_down.weight"] = "Q4_K"  # rows of 128: not a multiple of 256
    with pytest.raises(MixquantError, match=r"blk\.0\.ffn_down\.weight.*multiple of 256"):
        write_gguf(src, plan, tmp_path / "x.gguf", progress=False)
    assert not (tmp_path / "x.gguf").exists()


# --------------------------------------------------------------------------------------------
# errors: one line, naming the file and the problem


def _truncate(path: Path, keep: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(keep)


def test_truncated_safetensors(tiny_copy):
    st = tiny_copy / "model.safetensors"
    _truncate(st, st.stat().st_size - 1000)
    with pytest.raises(MixquantError, match=r"model\.safetensors: truncated safetensors file: tensor .* ends at byte"):
        open_source(tiny_copy)


def test_truncated_safetensors_header(tiny_copy):
    st = tiny_copy / "model.safetensors"
    _truncate(st, 100)
    with pytest.raises(MixquantError, match=r"model\.safetensors: truncated or corrupt safetensors file"):
        open_source(tiny_copy)
    _truncate(st, 5)
    with pytest.raises(MixquantError, match=r"model\.safetensors: truncated safetensors file"):
        open_source(tiny_copy)


def test_corrupt_safetensors_header(tiny_copy):
    st = tiny_copy / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[10:14] = b"\xff\xfe{["
    st.write_bytes(bytes(data))
    with pytest.raises(MixquantError, match=r"model\.safetensors: corrupt safetensors header"):
        open_source(tiny_copy)


def test_missing_shard(tmp_path, tokenizer_dir):
    folder = _tiny_model(tmp_path / "sharded", tokenizer_dir, shard=True)
    victim = sorted(folder.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(MixquantError, match=re.escape(victim.name) + ": missing safetensors shard"):
        open_source(folder)


def test_missing_tensor(tiny_copy):
    from safetensors.numpy import load_file, save_file

    st = tiny_copy / "model.safetensors"
    weights = load_file(st)
    del weights["model.layers.1.mlp.gate_proj.weight"]
    save_file(weights, st, metadata={"format": "pt"})
    with pytest.raises(MixquantError, match=r"model\.safetensors: missing tensors: blk\.1\.ffn_gate\.weight"):
        open_source(tiny_copy)


def test_untied_model_without_lm_head(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MixquantError, match=r"missing tensors: output\.weight"):
        open_source(tiny_copy)


def test_nan_in_tensor_is_reported_by_name(tiny_copy, tmp_path):
    from safetensors.numpy import load_file, save_file

    st = tiny_copy / "model.safetensors"
    weights = load_file(st)
    weights["model.layers.0.mlp.up_proj.weight"][3, 5] = np.nan
    save_file(weights, st, metadata={"format": "pt"})
    src = open_source(tiny_copy)  # found when the tensor is read
    with pytest.raises(MixquantError, match=r"model\.safetensors: tensor blk\.0\.ffn_up\.weight .*1 NaN/Inf"):
        src.tensor("blk.0.ffn_up.weight")
    out = tmp_path / "nan.gguf"
    with pytest.raises(MixquantError, match=r"blk\.0\.ffn_up\.weight"):
        write_gguf(src, _f32_plan(src), out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".nan.gguf.*"))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda cfg: "{not json", r"config\.json: malformed config\.json"),
        (lambda cfg: json.dumps([1, 2]), r"config\.json: malformed config\.json: not a JSON object"),
        (lambda cfg: json.dumps({k: v for k, v in cfg.items() if k != "num_hidden_layers"}),
         r"config\.json: malformed config\.json: num_hidden_layers missing"),
        (lambda cfg: json.dumps({**cfg, "hidden_size": "64"}), r"config\.json: malformed config\.json: hidden_size"),
        (lambda cfg: json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}),
         r"config\.json: unsupported architecture 'GPT2LMHeadModel'; supported: LlamaForCausalLM"),
        (lambda cfg: json.dumps({**cfg, "architectures": None, "model_type": "gpt2"}),
         r"config\.json: unsupported architecture 'model_type gpt2'"),
    ],
)
def test_bad_config(tiny_copy, edit, message):
    path = tiny_copy / "config.json"
    path.write_text(edit(json.loads(path.read_text())))
    with pytest.raises(MixquantError, match=message) as info:
        open_source(tiny_copy)
    assert "\n" not in str(info.value)


def test_missing_config_and_tokenizer(tiny_copy):
    (tiny_copy / "tokenizer.json").unlink()
    with pytest.raises(MixquantError, match=r"tokenizer\.json: missing tokenizer\.json"):
        open_source(tiny_copy)
    (tiny_copy / "tokenizer.json").write_text("{]")
    with pytest.raises(MixquantError, match=r"tokenizer\.json: malformed tokenizer\.json"):
        open_source(tiny_copy)
    (tiny_copy / "config.json").unlink()
    with pytest.raises(MixquantError, match=r"config\.json: missing config\.json"):
        open_source(tiny_copy)


def test_bad_paths(tmp_path):
    with pytest.raises(MixquantError, match="no such file or folder"):
        open_source(tmp_path / "nope")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\0" * 100)
    with pytest.raises(MixquantError, match=r"junk\.bin: neither a GGUF file nor a Hugging Face model folder"):
        open_source(junk)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MixquantError, match=r"empty/config\.json: missing config\.json"):
        open_source(tmp_path / "empty")


def test_truncated_and_foreign_gguf(tiny_src, tmp_path):
    src = tiny_src
    out = tmp_path / "t.gguf"
    write_gguf(src, _f32_plan(src), out, progress=False)
    _truncate(out, out.stat().st_size // 2)
    with pytest.raises(MixquantError, match=r"t\.gguf: .*truncated"):
        open_source(out)
    _truncate(out, 1000)
    with pytest.raises(MixquantError, match=r"t\.gguf: .*truncated"):
        open_source(out)

    w = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(MixquantError, match=r"gpt2\.gguf: unsupported architecture 'gpt2'"):
        open_source(tmp_path / "gpt2.gguf")


# --------------------------------------------------------------------------------------------
# slow: llama.cpp's converter and tools are the referee


def _llama_cpp_src() -> Path:
    from mixquant.cache import cache_dir

    src = cache_dir() / "llama.cpp" / "src"
    if not (src / "convert_hf_to_gguf.py").is_file():
        pytest.skip("llama.cpp source not in the cache")
    return src


def _convert_hf_to_gguf(folder: Path, out: Path, tmp_path: Path) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py --outtype f32 (with a stub for its unused sentencepiece import)."""
    src = _llama_cpp_src()
    stub = tmp_path / "stub"
    stub.mkdir(exist_ok=True)
    (stub / "sentencepiece.py").write_text("class SentencePieceProcessor:\n    pass\n")
    env = {**os.environ, "PYTHONPATH": f"{src / 'gguf-py'}{os.pathsep}{stub}", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f32",
                           "--outfile", str(out)], env=env, capture_output=True, text=True, timeout=900)
    if done.returncode:
        pytest.fail(f"convert_hf_to_gguf.py failed:\n{done.stderr[-3000:]}")


def _assert_same_gguf(ours: Path, theirs: Path) -> None:
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)

    def kv(r):
        return {k: (tuple(f.types), f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}

    ka, kb = kv(a), kv(b)
    assert set(ka) == set(kb)
    for key in ka:
        assert ka[key] == kb[key], key
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    for name, t in ta.items():
        assert t.tensor_type == tb[name].tensor_type, name
        assert t.shape.tolist() == tb[name].shape.tolist(), name
        assert np.array_equal(np.asarray(t.data), np.asarray(tb[name].data)), name


@pytest.mark.slow
@pytest.mark.parametrize("case", ["llama-bf16-sharded-untied", "qwen3-f32-untied", "mistral-f16"])
def test_f32_export_equals_convert_hf_to_gguf_tiny(case, tmp_path, tokenizer_dir):
    folder = _tiny_model(tmp_path / case, tokenizer_dir, **CASES[case])
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    src = open_source(folder)
    write_gguf(src, _f32_plan(src), ours, progress=False)
    _convert_hf_to_gguf(folder, theirs, tmp_path)
    _assert_same_gguf(ours, theirs)


@pytest.fixture(scope="module")
def real_model() -> Path:
    from mixquant.testdata import build_test_model

    return build_test_model()


@pytest.mark.slow
def test_real_model_f32_equals_convert_hf_to_gguf(real_model, tmp_path):
    src = open_source(real_model)
    assert (src.model.arch, src.model.n_layer, src.model.n_head, src.model.n_head_kv) == ("llama", 30, 9, 3)
    assert src.model.tied_output and len(src.model.tensors) == 272
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    write_gguf(src, _f32_plan(src), ours, progress=False)
    _convert_hf_to_gguf(real_model, theirs, tmp_path)
    _assert_same_gguf(ours, theirs)


@pytest.mark.slow
def test_real_model_loads_in_llama_cpp(real_model, tmp_path):
    from mixquant.reference import llama_tool
    from mixquant.testdata import build_test_text

    _, eval_text = build_test_text()
    perplexity = llama_tool("llama-perplexity")
    src = open_source(real_model)
    ppl = {}
    for preset in ("F32", "Q8_0"):
        out = tmp_path / f"{preset}.gguf"
        write_gguf(src, preset_plan(src.model, preset), out, progress=False, file_type=preset)
        done = subprocess.run([str(perplexity), "-m", str(out), "-f", str(eval_text), "-c", "512", "--chunks", "2",
                               "-t", "2"], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        m = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stdout + done.stderr)
        assert m, (done.stdout + done.stderr)[-3000:]
        ppl[preset] = float(m.group(1))
    assert 5 < ppl["F32"] < 30, ppl
    assert abs(ppl["Q8_0"] / ppl["F32"] - 1) < 0.02, ppl
