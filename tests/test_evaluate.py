"""Evaluation (mixquant.evaluate): PPL, KLD and top-1 against the float32 reference, as llama-perplexity."""

import json
import math
import re
import subprocess
import warnings

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama, random_text

from mixquant.errors import MixquantError
from mixquant.evaluate import Evaluator, format_table, plot_results, unpermute_qk

CTX = 32
CHUNKS = 3

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer GQA llama (HF folder) and a text file for it."""
    root = tmp_path_factory.mktemp("tiny")
    folder = make_tiny_llama(root / "model", vocab_size=320, intermediate_size=128, tie_word_embeddings=False)
    text = root / "eval.txt"
    text.write_text(random_text(400, 1))
    return folder, text


@pytest.fixture(scope="module")
def evaluator(tiny, tmp_path_factory):
    folder, text = tiny
    ev = Evaluator(folder, text, ctx=CTX, chunks=CHUNKS, cache=tmp_path_factory.mktemp("evcache"), progress=False)
    yield ev
    ev.close()


# --- mechanics on the tiny model ------------------------------------------------------------------


def test_unpermute_inverts_the_converter_permutation():
    from mixquant.source import permute_qk

    w = np.random.default_rng(0).standard_normal((96, 8)).astype(np.float32)
    assert np.array_equal(unpermute_qk(permute_qk(w, 6, 6), 6), w)
    assert np.array_equal(unpermute_qk(permute_qk(w, 12, 3), 3), w)


def test_gguf_orientation_round_trips_to_the_checkpoint(evaluator):
    """source.tensor (GGUF orientation, q/k permuted) mapped back equals transformers' parameter."""
    ev = evaluator
    ev.restore()
    for name, p in ev.params.items():
        back = ev._to_hf(name, ev.source.tensor(name))
        assert np.array_equal(back, p.detach().numpy()), name
    assert "output.weight" in ev.params and "blk.1.attn_k.weight" in ev.params


def test_windows_and_scored_tokens(evaluator):
    ev = evaluator
    assert tuple(ev.windows.shape) == (CHUNKS, CTX)
    ref = ev.reference()
    # llama-perplexity scores the second half: positions ctx/2 .. ctx-2 predict tokens ctx/2+1 .. ctx-1
    assert ref.nll.shape == (CHUNKS, CTX - 1 - CTX // 2)
    assert ref.codes.shape == (CHUNKS, CTX - 1 - CTX // 2, ev.model.config.vocab_size)
    # the reference PPL is the exp of the mean NLL of exactly those tokens
    with torch.inference_mode():
        logits = ev.model(ev.windows).logits.double()
    logp = torch.log_softmax(logits, -1)
    first = CTX // 2
    nll = -logp[:, first:-1].gather(2, ev.windows[:, first + 1:, None]).squeeze(2)
    assert math.isclose(ref.ppl, math.exp(nll.mean().item()), rel_tol=1e-6)
    assert np.array_equal(ref.top1, logits[:, first:-1].argmax(-1).numpy())
    # the stored distributions decode to the reference's within the fixed-point step
    assert torch.allclose(ref.logprobs(0), logp[0, first:-1], atol=1e-3)


def test_f32_plan_reproduces_the_reference(evaluator):
    ev = evaluator
    r = ev.evaluate_plan("F32")
    assert r.kind == "plan" and r.label == "F32"
    assert math.isclose(r.ppl, r.ppl_ref, rel_tol=1e-6)
    assert abs(r.kld_mean) < 1e-6 and r.kld_p99 < 1e-5
    assert r.top1 == 1.0
    assert r.tokens == CHUNKS * (CTX - 1 - CTX // 2)
    assert r.bits_per_weight == 32.0 and r.tokens_per_s > 0


def test_quantized_plans_cost_kld(evaluator):
    ev = evaluator
    q8 = ev.evaluate_plan("Q8_0")
    q4 = ev.evaluate_plan("Q4_0")
    assert 0 < q8.kld_mean < q4.kld_mean
    assert q4.kld_p99 >= q4.kld_median > 0
    assert q4.top1 <= q8.top1 <= 1.0
    assert q4.bits_per_weight < q8.bits_per_weight < 32
    assert q4.ppl != q4.ppl_ref
    d = q4.to_dict()
    assert json.loads(json.dumps(d))["kld_mean"] == q4.kld_mean and "ppl_ratio" in d
    # the model's weights really are the quantized ones, and restore() undoes it
    ev.restore()
    assert ev.evaluate_plan("F32").kld_mean < 1e-6


def test_plan_weights_are_the_exported_bytes(evaluator, tmp_path):
    """A plan evaluated in memory and the GGUF file write_gguf makes from it give the same numbers."""
    from mixquant.export import write_gguf
    from mixquant.plan import preset_plan

    ev = evaluator
    plan = preset_plan(ev.source.model, "Q4_0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_gguf(ev.source, plan, tmp_path / "tiny-q4_0.gguf", progress=False)
    from_plan = ev.evaluate_plan(plan, label="plan")
    from_file = ev.evaluate_gguf(tmp_path / "tiny-q4_0.gguf")
    assert from_file.label == "tiny-q4_0.gguf" and from_file.kind == "gguf"
    assert from_file.ppl == from_plan.ppl and from_file.kld_mean == from_plan.kld_mean
    assert from_file.top1 == from_plan.top1
    assert math.isclose(from_file.bits_per_weight, from_plan.bits_per_weight)
    assert from_file.bytes > from_plan.bytes  # the file also holds the header and the tokenizer


def test_imatrix_is_passed_to_the_quantizer(evaluator):
    ev = evaluator
    rng = np.random.default_rng(0)
    imp = {t.name: rng.uniform(0.01, 10, t.shape[-1]).astype(np.float32) for t in ev.source.model.tensors
           if len(t.shape) == 2}
    plain = ev.evaluate_plan("IQ4_NL")
    weighted = ev.evaluate_plan("IQ4_NL", imatrix=imp)
    assert weighted.label == "IQ4_NL +imatrix"
    assert weighted.kld_mean != plain.kld_mean


def _ggml_round_trip(ggml, fn: str, type_name: str, x: np.ndarray) -> np.ndarray:
    import ctypes

    from gguf import GGMLQuantizationType

    lib = ggml.lib
    t = int(GGMLQuantizationType[type_name])
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    buf = np.zeros(lib.ggml_row_size(t, x.size), dtype=np.uint8)
    out = np.empty_like(x)
    quant = getattr(lib, f"quantize_row_{fn}_ref")
    deq = getattr(lib, f"dequantize_row_{fn}")
    for f in (quant, deq):
        f.restype = None
        f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    quant(x.ctypes.data, buf.ctypes.data, x.size)
    deq(buf.ctypes.data, out.ctypes.data, x.size)
    return out


def test_activation_rounding_matches_ggml(ggml):
    from mixquant.evaluate import activation_type, round_activations

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 512)).astype(np.float32) * rng.uniform(0.01, 10, (6, 1)).astype(np.float32)
    x[0, 5] = 40.0  # an outlier: it sets its block's scale
    x[1, :256] = 0.0  # an all-zero block
    x[2, 300] = -55.0  # a negative extreme (Q8_K's scale follows its sign)
    ours = round_activations(torch.from_numpy(x), "Q8_K").numpy().reshape(-1)
    assert np.array_equal(ours, _ggml_round_trip(ggml, "q8_K", "Q8_K", x))
    ours = round_activations(torch.from_numpy(x), "Q8_0").numpy().reshape(-1)
    ref = _ggml_round_trip(ggml, "q8_0", "Q8_0", x)
    # ggml-cpu's AVX2 row quantizer multiplies by 127/amax where the reference one uses 1/(amax/127):
    # the two may round a value that sits on a tie differently, nothing more
    assert np.mean(ours != ref) < 1e-3 and np.allclose(ours, ref, rtol=0, atol=np.abs(x).max() / 127)
    assert [activation_type(t) for t in ("F32", "F16", "Q4_0", "Q5_1", "IQ4_NL", "Q4_K", "Q6_K", "IQ4_XS")] == \
        [None, "F16", "Q8_0", "Q8_0", "Q8_0", "Q8_K", "Q8_K", "Q8_K"]


def test_cpu_activations_add_llama_cpp_rounding(tiny, evaluator):
    folder, text = tiny
    cpu = Evaluator(folder, text, ctx=CTX, chunks=CHUNKS, cache=evaluator.cache_root, progress=False,
                    cpu_activations=True)
    assert cpu.evaluate_plan("F32").kld_mean < 1e-6  # float32 weights: llama.cpp rounds nothing either
    weights_only = evaluator.evaluate_plan("Q8_0")
    both = cpu.evaluate_plan("Q8_0")
    assert both.cpu_activations and not weights_only.cpu_activations
    assert both.kld_mean > 1.2 * weights_only.kld_mean
    assert "llama.cpp's CPU backend" in format_table([both])
    # the hooks are gone afterwards
    assert not any(m._forward_pre_hooks for m in cpu.model.modules())
    cpu.close()


def test_reference_is_cached(tiny, evaluator, monkeypatch):
    folder, text = tiny
    evaluator.reference()
    again = Evaluator(folder, text, ctx=CTX, chunks=CHUNKS, cache=evaluator.cache_root, progress=False)
    monkeypatch.setattr(Evaluator, "_compute_reference", lambda *a: pytest.fail("reference recomputed"))
    ref = again.reference()
    assert ref.folder == evaluator.reference().folder and ref.ppl == evaluator.reference().ppl
    assert again._model is None  # the cached reference did not even load the model
    # another chunk count or context is another reference
    other = Evaluator(folder, text, ctx=CTX, chunks=CHUNKS - 1, cache=evaluator.cache_root, progress=False)
    assert other.cache_key() != again.cache_key()


def test_bad_inputs_are_one_line_errors(tiny, evaluator, tmp_path):
    folder, text = tiny
    ev = evaluator
    with pytest.raises(MixquantError, match="no such"):
        ev.evaluate_gguf(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(MixquantError, match="not a GGUF"):
        ev.evaluate_gguf(tmp_path / "junk.gguf")
    with pytest.raises(MixquantError, match="unknown preset"):
        ev.evaluate_plan("Q9_X")
    with pytest.raises(MixquantError, match="Hugging Face folder"):
        Evaluator(tmp_path / "junk.gguf", text, ctx=CTX)
    with pytest.raises(MixquantError, match="no such text"):
        Evaluator(folder, tmp_path / "none.txt", ctx=CTX)
    with pytest.raises(MixquantError, match="at least"):
        Evaluator(folder, text, ctx=4096)
    with pytest.raises(MixquantError, match="chunks must be at least 1"):
        Evaluator(folder, text, ctx=CTX, chunks=0)


def test_compare_items_are_checked_before_any_work(tmp_path):
    from mixquant.evaluate import check_items, is_gguf_item
    from mixquant.plan import ModelInfo, TensorInfo

    model = ModelInfo(arch="llama", n_layer=1, n_head=4, n_head_kv=4, n_embd=256,
                      tensors=[TensorInfo("token_embd.weight", (100, 256)), TensorInfo("blk.0.attn_q.weight", (256, 256)),
                               TensorInfo("blk.0.attn_norm.weight", (256,))])
    assert is_gguf_item("x.gguf") and is_gguf_item("dir/x") and not is_gguf_item("Q4_K_M")
    check_items(["Q4_K_M", "q8_0", "F32"], model)
    with pytest.raises(MixquantError, match="cannot quantize to"):
        check_items(["Q4_K_M", "IQ2_XXS"], model, imatrix={})
    with pytest.raises(MixquantError, match="no such GGUF"):
        check_items([str(tmp_path / "missing.gguf")], model)
    with pytest.raises(MixquantError, match="unknown preset"):
        check_items(["Q4_K_MM"], model)


def test_gguf_of_another_model_is_rejected(tiny, evaluator, tmp_path):
    """A GGUF whose tensors do not match the model (here: one layer less) is refused by name."""
    import gguf

    ev = evaluator
    w = gguf.GGUFWriter(tmp_path / "other.gguf", "llama")
    w.add_block_count(1)
    for name, p in ev.params.items():
        if not name.startswith("blk.1."):
            w.add_tensor(name, p.detach().numpy().copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(MixquantError, match=r"block_count|do not match"):
        ev.evaluate_gguf(tmp_path / "other.gguf")


def test_table_and_plot(evaluator, tmp_path):
    ev = evaluator
    results = [ev.evaluate_plan("F32"), ev.evaluate_plan("Q8_0"), ev.evaluate_plan("Q4_0")]
    table = format_table(results)
    assert table.count("\n") == 2 + len(results)
    assert "Q4_0" in table and "mean KLD" in table
    out = plot_results(results, tmp_path / "kld.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_eval_and_compare(tiny, tmp_path, capsys, monkeypatch):
    from mixquant.cli import main

    folder, text = tiny
    monkeypatch.setenv("MIXQUANT_CACHE", str(tmp_path / "cache"))
    rc = main(["eval", str(folder), "--plan", "Q8_0", "--text", str(text), "--ctx", str(CTX),
               "--chunks", str(CHUNKS), "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["label"] == "Q8_0" and d["kld_mean"] > 0
    rc = main(["compare", str(folder), "F32", "Q4_0", "--text", str(text), "--ctx", str(CTX),
               "--chunks", str(CHUNKS), "--plot", str(tmp_path / "c.png")])
    out = capsys.readouterr().out
    assert rc == 0 and "Q4_0" in out and (tmp_path / "c.png").is_file()
    # --imatrix: an imatrix file as llama-imatrix writes it, applied to the plan's quantization
    from mixquant.calibrate import Imatrix, write_imatrix
    from mixquant.source import open_source

    rng = np.random.default_rng(0)
    model = open_source(folder).model
    sums = {t.name: rng.uniform(0.01, 10, t.shape[-1]) for t in model.tensors
            if len(t.shape) == 2 and t.name.startswith("blk.")}
    write_imatrix(Imatrix(sums=sums, counts={n: 10 for n in sums}, chunks=1, chunk_size=CTX), tmp_path / "im.gguf")
    args = ["eval", str(folder), "--plan", "IQ4_NL", "--text", str(text), "--ctx", str(CTX), "--chunks", str(CHUNKS),
            "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--imatrix", str(tmp_path / "im.gguf")]) == 0
    weighted = json.loads(capsys.readouterr().out)
    assert weighted["label"] == "IQ4_NL +imatrix" and weighted["kld_mean"] != plain["kld_mean"]
    rc = main(["eval", str(folder), "--gguf", str(tmp_path / "nope.gguf"), "--text", str(text),
               "--ctx", str(CTX), "--chunks", str(CHUNKS)])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "nope.gguf" in err


# --- the real test model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    from mixquant.testdata import build_test_model, build_test_text

    folder = build_test_model()
    _, text = build_test_text()
    ev = Evaluator(folder, text, ctx=512, chunks=2, progress=False)
    yield ev
    ev.close()


@pytest.mark.slow
def test_smollm_f32_plan_matches_reference(smollm):
    r = smollm.evaluate_plan("F32")
    assert r.kld_mean < 1e-6
    assert r.top1 > 0.999
    assert math.isclose(r.ppl, r.ppl_ref, rel_tol=1e-5)


def _llama_perplexity(*args) -> str:
    from mixquant.reference import llama_tool

    done = subprocess.run([str(llama_tool("llama-perplexity")), *map(str, args), "-c", "512", "--chunks", "2",
                           "-t", "2"], capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-2000:]
    return log


def _number(pattern: str, log: str) -> float:
    m = re.search(pattern, log)
    assert m, f"{pattern!r} not in llama-perplexity's output: {log[-2000:]}"
    return float(m.group(1))


def _with_cpu_activations(evaluator, path):
    """evaluate_gguf with activations rounded as ggml-cpu does (same model, no second copy)."""
    evaluator.cpu_activations = True
    try:
        return evaluator.evaluate_gguf(path)
    finally:
        evaluator.cpu_activations = False


@pytest.fixture(scope="module")
def llama_base(smollm, tmp_path_factory):
    """llama-perplexity's float32 run on the test model's F32 GGUF: its log and --kl-divergence-base file."""
    from mixquant.export import write_gguf
    from mixquant.plan import preset_plan

    folder = tmp_path_factory.mktemp("llama_base")
    f32 = folder / "smollm-f32.gguf"
    write_gguf(smollm.source, preset_plan(smollm.source.model, "F32"), f32, progress=False)
    log = _llama_perplexity("-m", f32, "-f", smollm.text_path, "--kl-divergence-base", folder / "base.kld")
    f32.unlink()
    yield log, folder / "base.kld"
    (folder / "base.kld").unlink(missing_ok=True)


@pytest.mark.slow
def test_smollm_gguf_matches_llama_perplexity(smollm, llama_base, tmp_path):
    """The same F32 and Q8_0 files through llama.cpp's llama-perplexity and through us: PPL within
    1%; KLD and top-1 with --kl-divergence close to ours once activations are rounded like ggml-cpu."""
    from mixquant.export import write_gguf
    from mixquant.plan import preset_plan

    src, text = smollm.source, smollm.text_path
    base, base_kld = llama_base
    q8 = tmp_path / "smollm-q8_0.gguf"
    try:
        write_gguf(src, preset_plan(src.model, "Q8_0"), q8, progress=False)
        llama_f32 = _number(r"Final estimate: PPL = ([0-9.]+)", base)
        kld = _llama_perplexity("-m", q8, "-f", text, "--kl-divergence-base", base_kld, "--kl-divergence")
        llama_q8 = _number(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", kld)
        llama_kld = _number(r"Mean\s+KLD:\s*([0-9.]+)", kld)
        llama_top1 = _number(r"Same top p:\s*([0-9.]+)", kld) / 100

        assert abs(smollm.reference().ppl / llama_f32 - 1) < 0.001, (smollm.reference().ppl, llama_f32)
        ours = smollm.evaluate_gguf(q8)
        assert abs(ours.ppl / llama_q8 - 1) < 0.01, (ours.ppl, llama_q8)
        assert 0 < ours.kld_mean < llama_kld and ours.top1 > 0.9
        # rounding the activations as ggml-cpu does gives llama.cpp's KLD
        cpu = _with_cpu_activations(smollm, q8)
        assert abs(cpu.ppl / llama_q8 - 1) < 0.01, (cpu.ppl, llama_q8)
        assert abs(cpu.kld_mean / llama_kld - 1) < 0.15, (cpu.kld_mean, ours.kld_mean, llama_kld)
        assert abs(cpu.top1 - llama_top1) < 0.02, (cpu.top1, llama_top1)
        print(f"\nllama.cpp F32 PPL {llama_f32:.4f}, ours {smollm.reference().ppl:.4f}; Q8_0 PPL {llama_q8:.4f}, "
              f"ours {ours.ppl:.4f} (cpu activations {cpu.ppl:.4f}); KLD {llama_kld:.6f}, ours {ours.kld_mean:.6f} "
              f"(cpu activations {cpu.kld_mean:.6f}); top-1 {llama_top1:.4f}, ours {ours.top1:.4f} ({cpu.top1:.4f})")
    finally:
        q8.unlink(missing_ok=True)


@pytest.mark.slow
def test_smollm_allocated_gguf_runs_in_llama_cpp(smollm, llama_base, tmp_path):
    """An allocated mixed-type plan (k-quants, IQ4, legacy types side by side), written as a GGUF:
    llama.cpp's llama-perplexity loads and runs it, and its PPL and KLD agree with ours."""
    from mixquant.allocate import allocate
    from mixquant.analyze import analyze
    from mixquant.export import write_gguf

    src, text = smollm.source, smollm.text_path
    sens = analyze(src, None, measure="none", types=["Q4_0", "Q5_1", "Q8_0", "Q3_K", "Q4_K", "Q6_K", "IQ4_NL"],
                   progress=False)
    plan = allocate(sens, bpw=5.2).plan
    assert len({t for t in plan.types.values() if t != "F32"}) >= 3, plan.type_counts()
    mixed = tmp_path / "mixed.gguf"
    try:
        write_gguf(src, plan, mixed, progress=False)
        log = _llama_perplexity("-m", mixed, "-f", text, "--kl-divergence-base", llama_base[1], "--kl-divergence")
        llama_ppl = _number(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", log)
        llama_kld = _number(r"Mean\s+KLD:\s*([0-9.]+)", log)
        ours = _with_cpu_activations(smollm, mixed)
        assert abs(ours.ppl / llama_ppl - 1) < 0.01, (ours.ppl, llama_ppl)
        assert abs(ours.kld_mean / llama_kld - 1) < 0.15, (ours.kld_mean, llama_kld)
        print(f"\nallocated {plan.type_counts()}: llama.cpp PPL {llama_ppl:.4f} KLD {llama_kld:.5f}; "
              f"ours {ours.ppl:.4f} {ours.kld_mean:.5f}")
    finally:
        mixed.unlink(missing_ok=True)
