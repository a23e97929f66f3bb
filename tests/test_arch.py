"""Architecture adapters (mixquant.arch): the registry, and Gemma 3, Phi-3 (also with long-context
rope) and Qwen3-MoE end to end on small random-weight models built here (SmolLM2's tokenizer), with
llama.cpp as the referee: its llama-quantize --dry-run chooses the same types, llama-imatrix
collects the same importance (per expert for MoE, whose imatrix llama-quantize then uses as mixquant
does), llama-perplexity loads our GGUF and agrees with mixquant eval."""

import functools
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from mixquant import arch
from mixquant.errors import MixquantError

CTX = 128  # > the sliding window below: the sliding layers' mask matters
CHUNKS = 2
# the LongRoPE Phi-3's original context: llama.cpp takes the long factors when its per-sequence
# context (llama-perplexity -c, padded to a multiple of 256) exceeds it, transformers when a
# window's length does; both take the short ones at CTX and the long ones at LONG_CTX
LONGROPE_ORIG_CTX = 256
LONG_CTX = 512


@pytest.fixture(scope="module")
def smollm_tokenizer(tmp_path_factory) -> Path:
    from mixquant.testdata import build_test_model

    built = build_test_model()
    out = tmp_path_factory.mktemp("tokenizer")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(built / f, out / f)
    return out


def _save(model, folder: Path, tokenizer: Path) -> Path:
    with torch.no_grad():  # norms away from their neutral value: a mix-up or a missing shift shows
        for _name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(0.2 * torch.randn_like(p) + (0.0 if "gemma" in type(model).__name__.lower() else 1.0))
    model.save_pretrained(folder)
    for f in tokenizer.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def make_tiny_gemma3(folder: Path, tokenizer: Path, vocab_size: int = 49152) -> Path:
    """A random 6-layer Gemma 3 (5 sliding-window layers, then a global one: llama.cpp's fixed
    pattern), rows of 256 so the k-quants apply, tied embedding of `vocab_size` rows (more than
    the tokenizer's 49152 tokens: rows the GGUF drops)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64,
                           sliding_window=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                           initializer_range=0.05, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                           tie_word_embeddings=True)
    return _save(Gemma3ForCausalLM(cfg).eval(), folder, tokenizer)


def make_tiny_phi3(folder: Path, tokenizer: Path, longrope: bool = False) -> Path:
    """A random 2-layer Phi-3 (fused qkv_proj and gate_up_proj), untied. `longrope`: with
    Phi-3-mini-128k's long-context rope (random long and short factors, an original context of
    LONGROPE_ORIG_CTX of 2048 positions), its config.json written as that checkpoint's is."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    rope = {}
    if longrope:
        rope = {"rope_scaling": {"type": "longrope", "long_factor": (1 + 15 * torch.rand(32)).tolist(),
                                 "short_factor": (0.5 + torch.rand(32)).tolist()}}
    cfg = Phi3Config(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                     original_max_position_embeddings=LONGROPE_ORIG_CTX if longrope else 2048, sliding_window=None,
                     initializer_range=0.05, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                     **rope)
    folder = _save(Phi3ForCausalLM(cfg).eval(), folder, tokenizer)
    if longrope:
        config = json.loads((folder / "config.json").read_text())
        config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
        (folder / "config.json").write_text(json.dumps({**config, **rope}, indent=2))
    return folder


def make_tiny_qwen3moe(folder: Path, tokenizer: Path) -> Path:
    """A random 2-layer Qwen3-MoE: 4 experts, 2 per token with their weights renormalised (as in
    the released checkpoints, and as llama.cpp always does), untied."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                         max_position_embeddings=2048, initializer_range=0.05, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False)
    return _save(Qwen3MoeForCausalLM(cfg).eval(), folder, tokenizer)


# --------------------------------------------------------------------------------------------
# the registry


def test_registry_finds_adapters_by_class_model_type_and_gguf_arch():
    assert arch.for_config({"architectures": ["MistralForCausalLM"]}).name == "llama"
    assert arch.for_config({"model_type": "gemma3_text"}).name == "gemma3"
    assert arch.for_config({"architectures": ["Phi3ForCausalLM"]}).name == "phi3"
    assert arch.for_gguf_arch("qwen3").name == "qwen3"
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM"} <= set(arch.hf_classes())
    with pytest.raises(MixquantError, match="unsupported architecture 'GPT2LMHeadModel'"):
        arch.for_config({"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(MixquantError, match="unsupported architecture 'falcon'"):
        arch.for_gguf_arch("falcon")


def test_inputs_and_feeds():
    llama, phi3 = arch.for_gguf_arch("llama"), arch.for_gguf_arch("phi3")
    assert {llama.input_of(f"blk.2.{k}.weight") for k in ("attn_q", "attn_k", "attn_v")} == {"blk.2.attn_in"}
    assert llama.input_of("blk.2.ffn_gate.weight") == llama.input_of("blk.2.ffn_up.weight") == "blk.2.ffn_in"
    assert llama.input_of("token_embd.weight", tied_output=True) == "output_in"
    assert llama.input_of("blk.2.attn_norm.weight") is None
    assert phi3.input_of("blk.0.attn_qkv.weight") == "blk.0.attn_in"
    assert llama.norm_feeds["attn_norm"] == ("attn_q", "attn_k", "attn_v")
    assert phi3.norm_feeds["ffn_norm"] == ("ffn_up",)


# --------------------------------------------------------------------------------------------
# Gemma 3 and Phi-3 end to end


# a tiny Gemma 3 whose embedding has 64 rows more than the tokenizer has tokens
OOV_VOCAB = 49152 + 64


@pytest.fixture(scope="module", params=["gemma3", "gemma3-oov", "phi3", "phi3-longrope", "qwen3moe"])
def family(request, tmp_path_factory, smollm_tokenizer):
    """(name, HF folder, opened source, F32 GGUF, evaluation text) of one tiny model."""
    from mixquant.export import write_gguf
    from mixquant.plan import preset_plan
    from mixquant.source import open_source
    from mixquant.testdata import build_test_text

    make = {"gemma3": make_tiny_gemma3, "gemma3-oov": functools.partial(make_tiny_gemma3, vocab_size=OOV_VOCAB),
            "phi3": make_tiny_phi3, "phi3-longrope": functools.partial(make_tiny_phi3, longrope=True),
            "qwen3moe": make_tiny_qwen3moe}[request.param]
    root = tmp_path_factory.mktemp(request.param)
    folder = make(root / "model", smollm_tokenizer)
    src = open_source(folder)
    f32 = root / "f32.gguf"
    write_gguf(src, preset_plan(src.model, "F32"), f32, progress=False, file_type="F32")
    _, eval_text = build_test_text()
    yield request.param, folder, src, f32, eval_text
    src.close()


def test_export_is_convert_hf_to_gguf_s(family):
    """Names, values (Gemma's norms stored as 1 + w), fused tensors kept fused, and the metadata
    llama.cpp needs; the adapter's inverse gives back the transformers parameters."""
    import gguf
    from transformers import AutoModelForCausalLM

    name, folder, src, f32, _ = family
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    params = src.adapter.parameters(model, src.model)
    assert set(params) == set(src.tensor_names) - src.adapter.derived
    reader = gguf.GGUFReader(f32)
    stored = {t.name: np.asarray(t.data) for t in reader.tensors}
    for tname, p in params.items():
        x = src.tensor(tname)
        hf = p.detach().numpy()[: x.shape[0]] if tname == "token_embd.weight" else p.detach().numpy()
        np.testing.assert_array_equal(stored[tname].reshape(x.shape), x)
        back = src.adapter.from_gguf(tname, x, src.model)
        if name.startswith("gemma3") and tname.endswith("norm.weight"):
            # stored as float32(1 + w), as the converter stores it; back = that - 1 exactly, so the
            # model computes x * (1 + back) = x * stored, as llama.cpp does
            np.testing.assert_array_equal(x, hf + np.float32(1))
            np.testing.assert_array_equal(np.float32(1) + back, x)
            np.testing.assert_allclose(back, hf, rtol=0, atol=2 ** -23)
        else:
            np.testing.assert_array_equal(back, hf)
    kv = src.metadata
    if name == "qwen3moe":
        assert stored["blk.0.ffn_gate_exps.weight"].shape == (4, 256, 256)  # experts x rows x cols
        assert stored["blk.0.ffn_gate_inp.weight"].shape == (4, 256)
        assert kv["qwen3moe.expert_count"].value == 4 and kv["qwen3moe.expert_used_count"].value == 2
        assert kv["qwen3moe.expert_feed_forward_length"].value == 256
    elif name.startswith("gemma3"):
        assert "output.weight" not in stored and "blk.0.post_ffw_norm.weight" in stored
        # Gemma3Model.modify_tensors keeps len(vocab) + len(added_tokens) rows of tokenizer.json (SmolLM2's
        # 17 added tokens are in its vocabulary too: 17 of the 64 extra rows stay), and llama.cpp
        # needs as many tokens as rows
        tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        rows = min(model.config.vocab_size, len(tok["model"]["vocab"]) + len(tok["added_tokens"]))
        assert (rows < model.config.vocab_size) == (name == "gemma3-oov")
        assert stored["token_embd.weight"].shape == (rows, 256) and len(kv["tokenizer.ggml.tokens"].value) == rows
        assert kv["gemma3.attention.sliding_window"].value == 32
        assert kv["gemma3.rope.freq_base"].value == 1_000_000.0
        assert kv["gemma3.rope.freq_base_swa"].value == 10_000.0
        assert kv["gemma3.attention.key_length"].value == 64
    else:
        assert stored["blk.0.attn_qkv.weight"].shape == (256 + 2 * 2 * 64, 256)
        assert stored["blk.0.ffn_up.weight"].shape == (2 * 512, 256)
        assert kv["phi3.rope.dimension_count"].value == 64
        assert kv["phi3.context_length"].value == 2048
        factors = {t.name: t for t in reader.tensors if t.name.startswith("rope_factors")}
        if name == "phi3":
            assert factors == {} and "phi3.rope.scaling.attn_factor" not in kv
            assert kv["phi3.rope.scaling.original_context_length"].value == 2048
        else:  # Phi3MiniModel.generate_extra_tensors': the factors as F32, the cos/sin scale
            rope = json.loads((folder / "config.json").read_text())["rope_scaling"]
            for kind in ("long", "short"):
                t = factors.pop(f"rope_factors_{kind}.weight")
                assert t.tensor_type == gguf.GGMLQuantizationType.F32
                np.testing.assert_array_equal(np.asarray(t.data), np.array(rope[f"{kind}_factor"], dtype=np.float32))
            assert factors == {}
            assert kv["phi3.rope.scaling.original_context_length"].value == LONGROPE_ORIG_CTX
            assert kv["phi3.rope.scaling.attn_factor"].value == \
                pytest.approx(math.sqrt(1 + math.log(2048 / LONGROPE_ORIG_CTX) / math.log(LONGROPE_ORIG_CTX)))


def test_runner_reproduces_the_full_forward_pass(family):
    """The analysis runner's per-block calls (the adapter's masks and rotary embeddings: two rope
    bases and a sliding window for Gemma 3) give the model's own logits."""
    from transformers import AutoModelForCausalLM

    from mixquant.analyze import _Runner

    _, folder, *_ = family
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    windows = torch.randint(3, 49152, (2, 80), generator=torch.Generator().manual_seed(0))
    runner = _Runner(model, windows, score_from=8)
    with torch.inference_mode():
        full = model(input_ids=windows).logits[:, 8:79].reshape(-1, model.config.vocab_size)
    torch.testing.assert_close(runner.ref, full, rtol=1e-4, atol=1e-4)
    assert runner.score(2) == (0.0, pytest.approx(runner.ref_nll, rel=1e-6))


def test_analyze_measures_and_fits(family):
    from mixquant.analyze import analyze

    name, folder, src, _, text = family
    first = "blk.0.attn_qkv.weight" if name.startswith("phi3") else "blk.0.attn_q.weight"
    last = "blk.1.ffn_up_exps.weight" if name == "qwen3moe" else "blk.1.ffn_down.weight"
    imatrix = None
    if name == "qwen3moe":  # with its per-expert imatrix: each expert weighed by its own slice
        from mixquant.calibrate import compute_imatrix
        from mixquant.text import read_text

        imatrix = compute_imatrix(folder, read_text(text), ctx=64, chunks=1, progress=False)
        assert imatrix.importance(last).size == 4 * 256
    sens = analyze(src, imatrix, text=text, n_windows=1, ctx=64, tensors=[first, last],
                   types=["Q4_0", "Q5_1", "Q8_0"], validate=[], fisher=True, progress=False, threads=1)
    for tname in (first, last):
        costs = sens[tname].types
        assert costs["Q4_0"].measured > costs["Q5_1"].measured > 0
        if name != "qwen3moe" or tname == first:  # a view into fused experts has no gradient of its own
            assert costs["Q4_0"].fisher > costs["Q8_0"].fisher > 0


def _run(cmd: list, timeout: int = 600) -> str:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{Path(str(cmd[0])).name} failed:\n{out[-3000:]}"
    return out


@pytest.mark.slow
def test_imatrix_agrees_with_llama_imatrix(family, tmp_path):
    from mixquant.calibrate import calibrate, read_imatrix
    from mixquant.reference import llama_tool
    from mixquant.text import read_text

    name, folder, src, f32, text = family
    # MoE: 3 windows of 172 tokens, so that llama-imatrix's plain products skip a 6-token micro-batch
    # (2 tokens of each window) but its experts' MUL_MAT_ID does not
    ctx, chunks = (172, 3) if name == "qwen3moe" else (CTX, CHUNKS)
    theirs_path = tmp_path / "theirs.gguf"
    _run([llama_tool("llama-imatrix"), "-m", f32, "-f", text, "-c", ctx, "--chunks", chunks, "-o", theirs_path,
          "-t", 2, "--no-ppl"])
    theirs = read_imatrix(theirs_path)
    cal = calibrate(folder, read_text(text), ctx=ctx, chunks=chunks, progress=False, dataset=str(text))
    ours = cal.imatrix
    assert ours.names == theirs.names and ours.counts == theirs.counts
    assert {n: c.tolist() for n, c in ours.expert_counts.items()} == \
        {n: c.tolist() for n, c in theirs.expert_counts.items()}
    if name == "qwen3moe":
        assert sorted(ours.expert_counts) == [f"blk.{i}.ffn_{k}_exps.weight" for i in (0, 1)
                                              for k in ("down", "gate", "up")]
        assert ours.counts["blk.0.ffn_gate_inp.weight"] == chunks * (ctx - 2)
        assert ours.expert_counts["blk.0.ffn_up_exps.weight"].sum() == chunks * ctx * 2  # 2 experts per token
    rel = np.concatenate([np.abs(ours.importance(n).astype(np.float64) - theirs.importance(n))
                          / np.maximum(theirs.importance(n).astype(np.float64), 1e-30) for n in theirs.names])
    print(f"\n{name}: imatrix vs llama-imatrix, {rel.size} columns: median {np.median(rel):.2e}, "
          f"p99 {np.quantile(rel, 0.99):.2e}")
    # measured: gemma3 median 4.6e-5, p99 5.7e-4 (llama.cpp's GELU reads a float16 table); phi3 4.2e-6, 6.0e-5
    assert np.median(rel) < 2e-4 and np.quantile(rel, 0.99) < 3e-3
    # the activation statistics follow the adapter's input groups: q/k/v (or qkv) share one
    last = src.model.n_layer - 1
    assert {"blk.0.attn_in", "blk.0.ffn_in", "blk.0.ffn_down_in", f"blk.{last}.residual", "output_in"} \
        <= set(cal.activations.stats)
    if name == "qwen3moe":
        _check_moe_imatrix_files(src, f32, theirs, theirs_path, ctx, tmp_path)


def _check_moe_imatrix_files(src, f32: Path, theirs, theirs_path: Path, ctx: int, tmp_path: Path) -> None:
    """llama-imatrix's MoE file rewritten byte for byte (GGUF, and its own conversion to .dat), and
    `mixquant quantize --imatrix` writes the bytes llama-quantize writes with it (each expert
    quantized with its own slice of the imatrix)."""
    from gguf import GGUFReader

    from mixquant.calibrate import write_imatrix
    from mixquant.cli import main
    from mixquant.reference import llama_tool

    assert write_imatrix(theirs, tmp_path / "back.gguf").read_bytes() == theirs_path.read_bytes()
    their_dat = tmp_path / "theirs.dat"
    _run([llama_tool("llama-imatrix"), "-m", f32, "--in-file", theirs_path, "-c", ctx, "--output-format", "dat",
          "-o", their_dat])
    assert write_imatrix(theirs, tmp_path / "ours.dat").read_bytes() == their_dat.read_bytes()

    def tensors(path: Path) -> dict[str, tuple[str, bytes]]:
        return {t.name: (t.tensor_type.name, bytes(np.asarray(t.data).view(np.uint8))) for t in GGUFReader(path).tensors}

    ours, llamas = tmp_path / "ours.gguf", tmp_path / "llamas.gguf"
    assert main(["quantize", str(f32), str(ours), "Q4_K_M", "--imatrix", str(theirs_path), "--threads", "2"]) == 0
    _run([llama_tool("llama-quantize"), "--imatrix", theirs_path, f32, llamas, "Q4_K_M", 2])
    a, b = tensors(ours), tensors(llamas)
    assert a.keys() == b.keys() and {a[n][0] for n in a if "_exps" in n} == {"Q4_K", "Q6_K"}
    assert [n for n in a if a[n] != b[n]] == []


@pytest.mark.parametrize("imatrix", [False, True])
def test_presets_match_llama_quantize(family, tmp_path, imatrix):
    from test_plan import dry_run, write_dummy_imatrix

    from mixquant.plan import preset_plan
    from mixquant.reference import llama_tool

    _, _, src, f32, _ = family
    dummy = tmp_path / "dummy.dat"
    write_dummy_imatrix(dummy)
    for preset in ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_S", "Q6_K", "IQ4_XS"):
        theirs, log = dry_run(llama_tool("llama-quantize"), f32, preset, {"has_imatrix": imatrix}, dummy)
        assert theirs is not None, log[-2000:]
        ours = preset_plan(src.model, preset, has_imatrix=imatrix).types
        assert ours == theirs, (preset, {n: (ours.get(n), t) for n, t in theirs.items() if ours.get(n) != t})


def _perplexity(f: Path, text: Path, *extra, ctx: int = CTX) -> str:
    from mixquant.reference import llama_tool

    return _run([llama_tool("llama-perplexity"), "-m", f, "-f", text, "-c", ctx, "--chunks", CHUNKS, "-t", 2,
                 *extra])


def _number(pattern: str, log: str) -> float:
    m = re.search(pattern, log)
    assert m, f"{pattern!r} not in llama-perplexity's output: {log[-2000:]}"
    return float(m.group(1))


@pytest.mark.slow
def test_eval_matches_llama_perplexity(family, tmp_path):
    """llama.cpp loads our F32 and Q4_K_M files and its perplexity equals mixquant eval's: F32 to
    1e-4 (measured 2e-6 to 2e-5; LongRoPE's factors swapped moved llama.cpp's by 3.6% at CTX and
    0.66% at LONG_CTX, its attn_factor left out by 3.3% and 0.29%), Q4_K_M to 1%. LongRoPE at CTX
    (both take the short factors) and at LONG_CTX (the long ones)."""
    from mixquant.evaluate import Evaluator
    from mixquant.export import write_gguf
    from mixquant.plan import preset_plan

    name, folder, src, f32, text = family
    q4 = tmp_path / "q4_k_m.gguf"
    write_gguf(src, preset_plan(src.model, "Q4_K_M"), q4, progress=False)
    for ctx in (CTX, LONG_CTX) if name == "phi3-longrope" else (CTX,):
        with Evaluator(src, text, ctx=ctx, chunks=CHUNKS, progress=False, cache=tmp_path / "cache") as ev:
            ref = ev.reference().ppl
            ours = ev.evaluate_gguf(q4)
        llama_f32 = _number(r"Final estimate: PPL = ([0-9.]+)", _perplexity(f32, text, ctx=ctx))
        llama_q4 = _number(r"Final estimate: PPL = ([0-9.]+)", _perplexity(q4, text, ctx=ctx))
        print(f"\n{name} (ctx {ctx}): PPL F32 llama.cpp {llama_f32:.4f}, mixquant {ref:.4f}; "
              f"Q4_K_M llama.cpp {llama_q4:.4f}, mixquant {ours.ppl:.4f} (KLD {ours.kld_mean:.5f})")
        assert abs(ref / llama_f32 - 1) < 1e-4
        assert abs(ours.ppl / llama_q4 - 1) < 0.01
        assert ours.kld_mean > 0 and math.isfinite(ours.kld_mean)


def test_phi3_longrope_config_errors(tmp_path, smollm_tokenizer):
    """A LongRoPE config llama.cpp could not use is refused in one line."""
    from mixquant.source import open_source

    folder = make_tiny_phi3(tmp_path / "model", smollm_tokenizer, longrope=True)
    good = json.loads((folder / "config.json").read_text())
    for change, message in [({"short_factor": good["rope_scaling"]["short_factor"][:30]}, "short_factor must be 32 positive"),
                            ({"long_factor": [0.0] * 32}, "long_factor must be 32 positive")]:
        (folder / "config.json").write_text(json.dumps({**good, "rope_scaling": {**good["rope_scaling"], **change}}))
        with pytest.raises(MixquantError, match=message):
            open_source(folder)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma3-oov"], indirect=True)
def test_gemma3_drops_the_rows_convert_hf_to_gguf_drops(family, tmp_path):
    """Every tensor of our F32 file equals convert_hf_to_gguf's (token_embd cut to the same rows);
    its token list is ours padded to config's vocab_size, one token per row we dropped (which
    llama.cpp refuses: token_embd then has fewer rows than the vocabulary)."""
    import gguf
    from test_source_export import _convert_hf_to_gguf

    _, folder, src, f32, _ = family
    theirs = tmp_path / "theirs.gguf"
    _convert_hf_to_gguf(folder, theirs, tmp_path)
    a, b = gguf.GGUFReader(f32), gguf.GGUFReader(theirs)
    ours_t, theirs_t = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert ours_t.keys() == theirs_t.keys()
    for tname, t in ours_t.items():
        assert t.shape.tolist() == theirs_t[tname].shape.tolist(), tname
        assert np.array_equal(np.asarray(t.data), np.asarray(theirs_t[tname].data)), tname
    ours_tokens, their_tokens = a.fields["tokenizer.ggml.tokens"].contents(), b.fields["tokenizer.ggml.tokens"].contents()
    rows = src.shape("token_embd.weight")[0]
    assert len(ours_tokens) == rows < len(their_tokens) == OOV_VOCAB
    assert their_tokens == ours_tokens + [f"[PAD{i}]" for i in range(rows, OOV_VOCAB)]


@pytest.mark.slow
def test_gemma3_270m_keeps_every_row():
    """The bundled Gemma 3 270M: its tokenizer.json's 262,144 tokens (and 6,384 added ones, all among
    them) cover every row, so nothing is dropped and the runtime's model is the checkpoint's."""
    from safetensors import safe_open

    from mixquant.runtime import StreamedModel
    from mixquant.source import open_source
    from mixquant.testdata import build_gemma_model

    with open_source(build_gemma_model()) as src:
        assert src.vocab_size == src.n_vocab == 262144
        assert src.shape("token_embd.weight") == (262144, 640)
        assert len(src.meta("tokenizer.ggml.tokens")) == 262144
        with safe_open(src.path / "model.safetensors", "np") as f:
            last = f.get_slice("model.embed_tokens.weight")[262141:262144]
        np.testing.assert_array_equal(src.tensor_rows("token_embd.weight", 262141, 262144), last.astype(np.float32))
        with StreamedModel(src) as sm:
            assert sm.model.config.vocab_size == 262144 and tuple(sm.head.weight.shape) == (262144, 640)


def make_spm_bpe_tokenizer(folder: Path) -> Path:
    """A tiny SentencePiece-style BPE tokenizer.json, laid out as Gemma's: spaces normalised to
    "\u2581", byte fallback with the 256 byte pieces after the control tokens, then the learned
    pieces in merge order (SentencePiece's score order)."""
    import json

    from conftest import random_text
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.Replace(" ", "\u2581")
    trained.train_from_iterator([random_text(3000, 0)], trainers.BpeTrainer(vocab_size=200, show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)]
    pieces += sorted(learned["vocab"], key=learned["vocab"].get)
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[tuple(m) if isinstance(m, list)
                                    else tuple(m.split(" ")) for m in learned["merges"]],
                               byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(specials)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
         "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True}))
    return folder


def test_gemma3_sentencepiece_vocabulary_tokenizes_as_transformers(tmp_path):
    """A SentencePiece-BPE tokenizer.json (Gemma's kind) becomes llama.cpp's "llama" vocabulary
    with scores in piece order: llama-tokenize on the exported GGUF gives transformers' tokens. The
    embedding has 8 rows more than the tokenizer's tokens: the GGUF keeps the converter's count of
    rows (the vocabulary plus the 4 added tokens, which are in it too) and as many tokens."""
    import json

    from conftest import random_text
    from transformers import AutoTokenizer

    from mixquant.export import write_gguf
    from mixquant.plan import preset_plan
    from mixquant.reference import llama_tool
    from mixquant.source import open_source

    tokenizer = make_spm_bpe_tokenizer(tmp_path / "tokenizer")
    n_vocab = len(json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"])
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=n_vocab + 8, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                           bos_token_id=2, eos_token_id=1, pad_token_id=0)
    folder = _save(Gemma3ForCausalLM(cfg).eval(), tmp_path / "model", tokenizer)
    src = open_source(folder)
    kv = src.metadata
    assert kv["tokenizer.ggml.model"].value == "llama" and kv["tokenizer.ggml.add_space_prefix"].value is False
    out = write_gguf(src, preset_plan(src.model, "F32"), tmp_path / "vocab.gguf", progress=False).path
    assert src.shape("token_embd.weight") == (n_vocab + 4, 64) and len(kv["tokenizer.ggml.tokens"].value) == n_vocab + 4
    text = tmp_path / "text.txt"
    text.write_text(random_text(600, 7) + "Zebra  quiz, 42 \u00e9t\u00e9 \u2603!\n", encoding="utf-8")
    done = subprocess.run([str(llama_tool("llama-tokenize")), "-m", str(out), "-f", str(text), "--ids", "--no-bos",
                           "--no-escape", "--log-disable"], capture_output=True, text=True, check=True)
    expected = json.loads(done.stdout.strip())
    ids = AutoTokenizer.from_pretrained(folder)(text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    assert len(ids) > 500 and ids == expected
