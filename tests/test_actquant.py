"""Activation quantization (mixquant.activations): the fake quantizers' arithmetic, the hooks and
SmoothQuant's folding on a tiny llama, the command line, and one run on the real test model."""

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama, random_text, tensor_cases

from mixquant import formats
from mixquant.activations import actquant, format_table, parse_scheme
from mixquant.activations import schemes as sc
from mixquant.activations.report import write_actquant_report
from mixquant.activations.runner import ActivationRunner
from mixquant.activations.stats import LogHistogram
from mixquant.cli import main
from mixquant.errors import MixquantError
from mixquant.evaluate import Evaluator, round_activations

CTX = 32


def _cases():
    return {k: torch.from_numpy(v) for k, v in tensor_cases(cols=256, rows=16).items()}


# --- the grids --------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_per_token_round_trip_is_within_half_a_step(bits):
    levels = sc.qmax(bits)
    for name, x in _cases().items():
        y = sc.per_token(x, levels)
        step = x.abs().amax(dim=-1, keepdim=True) / levels
        assert torch.all((y - x).abs() <= step / 2 * (1 + 1e-6) + 1e-30), name
        q = torch.where(step > 0, y / step, torch.zeros_like(y))
        assert torch.allclose(q, q.round(), atol=1e-3), name  # on the grid
        assert q.abs().max() <= levels + 1e-3


def test_block32_at_8_bits_is_ggml_cpus_q8_0_rounding():
    """evaluate.round_activations reproduces ggml-cpu's Q8_0 activations; per_block must equal it."""
    for name, x in _cases().items():
        assert torch.equal(sc.per_block(x, 127), round_activations(x, "Q8_0")), name


def test_q8_0_weights_match_the_gguf_codec():
    for name, x in tensor_cases(cols=256, rows=16).items():
        codec = formats.dequantize(formats.quantize(x, "Q8_0"), "Q8_0", x.shape)
        ours = sc.q8_0_weights(torch.from_numpy(x)).numpy()
        assert np.mean(ours != codec) < 1e-3, name  # identical but for exact .5 ties (round half even/away)


def test_asymmetric_grid_keeps_zero_and_clips_outside():
    x = torch.linspace(-1, 3, 1001)
    y = sc.asymmetric(x, -1.0, 2.0, 8)
    d = 3.0 / 255
    inside = x <= 2.0
    assert torch.all((y - x)[inside].abs() <= d / 2 + 1e-6)
    assert torch.allclose(y[~inside], torch.full_like(y[~inside], y[inside].max().item()))
    assert sc.asymmetric(torch.zeros(3), -1.0, 2.0, 8).abs().max() == 0  # zero is exact (integer zero point)
    assert len(torch.unique(sc.asymmetric(x, -1.0, 2.0, 4))) <= 16


def test_llm_int8_limits():
    """Threshold inf: every column is rounded, i.e. plain per-token int8; threshold 0: every column
    that has any non-zero value stays float, i.e. the float activations."""
    for name, x in _cases().items():
        y, cols = sc.llm_int8(x, float("inf"), 127)
        assert torch.equal(y, sc.per_token(x, 127)) and not cols.any(), name
        y, cols = sc.llm_int8(x, 0.0, 127)
        assert torch.equal(y, x), name
    x = torch.randn(64, 128)
    x[5, 17] = 40.0
    y, cols = sc.llm_int8(x, 6.0, 127)
    assert cols.nonzero().flatten().tolist() == [17] and torch.equal(y[:, 17], x[:, 17])
    assert torch.equal(y[:, :17], sc.per_token(torch.cat((x[:, :17], torch.zeros(64, 1), x[:, 18:]), 1), 127)[:, :17])


def test_log_histogram_percentiles_within_one_bin():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_t(3, 200_000).astype(np.float32) * 0.7 + 0.1)
    h = LogHistogram()
    for part in x.split(50_000):
        h.add(part)
    bin_ratio = 2 ** (1 / LogHistogram.PER_OCTAVE)
    for p in (50.0, 99.0, 99.9, 99.99):
        exact = float(np.percentile(x.abs().numpy(), p))
        assert exact <= h.abs_percentile(p) <= exact * bin_ratio * 1.0001, p
        hi = float(np.percentile(x.numpy(), p))
        lo = float(np.percentile(x.numpy(), 100 - p))
        assert hi <= h.signed_percentile(p) <= hi * bin_ratio * 1.0001, p
        if lo < 0:  # (the outer edge is away from zero)
            assert lo * bin_ratio * 1.0001 <= h.signed_percentile(100 - p) <= lo, p


def test_mse_clip_finds_the_measured_best_clip():
    """The histogram's expected-error model picks a clip whose real round-trip error is within a few
    percent of the best clip found by brute force on the values themselves."""
    x = torch.from_numpy(np.random.default_rng(1).standard_t(2, 200_000).astype(np.float32))
    h = LogHistogram()
    h.add(x)
    amax = float(x.abs().max())
    for levels in (127, 7):
        c = sc.mse_clip(h.centers(), h.negative + h.positive, amax, levels)
        def real(clip, levels=levels):
            return float(((sc.symmetric(x, torch.tensor(clip), levels) - x) ** 2).mean())

        brute = min(real(float(t)) for t in amax * torch.logspace(-3, 0, 400))
        assert real(c) <= 1.05 * brute < real(amax), (levels, c, real(c), brute)


@pytest.mark.parametrize("name, message", [
    ("minmax", "unknown scheme"), ("percentile-0-sym", "(0, 100]"), ("percentile-101-sym", "(0, 100]"),
    ("smoothquant-1.5", "alpha"), ("per-tokens", "unknown scheme")])
def test_bad_scheme_names(name, message):
    with pytest.raises(MixquantError, match=message.replace("(", r"\(").replace("]", r"\]")):
        parse_scheme(name)


def test_scheme_names_are_canonical():
    assert parse_scheme("llm.int8").name == "llm.int8-6"
    assert parse_scheme("smoothquant").name == "smoothquant-0.5"
    assert parse_scheme("percentile-100-asym").percentile == 100
    with pytest.raises(MixquantError, match="bits must be 4 or 8"):
        sc.qmax(3)


# --- hooks on a tiny llama ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("actquant")
    folder = make_tiny_llama(root / "model", vocab_size=320, intermediate_size=128, tie_word_embeddings=False)
    (root / "eval.txt").write_text(random_text(300, 1))
    (root / "calib.txt").write_text(random_text(300, 2))
    return folder, root


@pytest.fixture(scope="module")
def runner(tiny):
    folder, root = tiny
    ev = Evaluator(folder, root / "eval.txt", ctx=CTX, chunks=2, cache=root / "cache", progress=False)
    r = ActivationRunner(ev)
    r.calibrate(ev.windows, progress=False)
    yield r
    ev.close()


def _logits(runner):
    with torch.inference_mode():
        return runner.ev.model(input_ids=runner.ev.windows).logits


def test_smoothing_is_folded_and_preserves_the_float_model(runner):
    before = {n: p.detach().clone() for n, p in runner.ev.model.named_parameters()}
    ref = _logits(runner)
    scales = runner.smoothing_scales(0.5)
    assert all(float((s - 1).abs().max()) > 0.01 for s in scales.values())  # smoothing really moves something
    with runner.smoothed(scales) as folded:
        smoothed = _logits(runner)
        norm = runner.norms["blk.0.attn_in"]
        assert not torch.equal(norm.weight, before["model.layers.0.input_layernorm.weight"])
    assert folded == {k: k.endswith(("attn_in", "ffn_in")) for k in runner.keys}
    assert torch.allclose(smoothed, ref, rtol=1e-4, atol=1e-4)
    for n, p in runner.ev.model.named_parameters():  # the parametrizations are gone, the weights untouched
        assert torch.equal(p, before[n]), n
    assert not any(hasattr(m, "parametrizations") for m in runner.ev.model.modules())


def test_hooks_change_the_forward_pass_and_leave_nothing_behind(runner):
    ref = _logits(runner)
    with runner.applied(parse_scheme("minmax-sym"), "Q8_0") as tally:
        q = _logits(runner)
    assert not torch.allclose(q, ref, atol=1e-4)
    # min/max from the same windows: the first input (float embeddings) is never clipped; later ones
    # see rounded upstream values, so a handful can be
    assert tally.per_key["blk.0.attn_in"][0] == 0 and tally.fraction < 1e-3
    assert torch.equal(_logits(runner), ref)
    # only one input quantized: a smaller change than all of them
    with runner.applied(parse_scheme("minmax-sym"), keys=[runner.keys[0]]):
        one = _logits(runner)
    assert 0 < (one - ref).abs().max() < (q - ref).abs().max()


def test_actquant_end_to_end_on_the_tiny_model(tiny, tmp_path):
    folder, root = tiny
    schemes = ["minmax-sym", "percentile-99.9-asym", "mse-sym", "per-token", "per-channel", "block32",
               "llm.int8", "llm.int8-1", "smoothquant", "smoothquant-0.8"]
    r = actquant(folder, root / "eval.txt", root / "calib.txt", schemes=schemes, weights="per-channel-int8",
                 ctx=CTX, chunks=2, calib_chunks=2, sensitivity_chunks=1, cache=root / "cache", progress=False)
    assert [x.scheme for x in r.rows] == ["weights only (per-channel-int8)"] + [parse_scheme(s).name for s in schemes]
    assert all(x.kld > 0 for x in r.rows)
    assert r.row("per-channel").int8_gemm is False
    assert r.row("llm.int8-1").outlier_fraction > r.row("llm.int8-6").outlier_fraction
    assert [p.float_inputs for p in r.curve][-1] == len(r.sensitivity) == 8
    # against the model with float activations (and these weights): nothing quantized, no damage
    assert r.curve[-1].kld < 1e-6 < r.curve[0].kld
    assert r.curve[0].kld >= max(s.kld for s in r.sensitivity)
    assert set(r.correlations) == {"kurtosis", "dynamic_range", "absmax"}
    table = format_table(r)
    assert "llm.int8-6" in table and "target KLD" in table
    page = write_actquant_report(tmp_path, r)
    assert "Findings" in page.read_text() and (tmp_path / "plots" / "act_worst_input.png").is_file()
    assert json.loads((tmp_path / "actquant.json").read_text())["rows"][1]["scheme"] == "minmax-sym"


def test_cli_json_and_bad_input(tiny, capsys, monkeypatch):
    folder, root = tiny
    monkeypatch.setenv("MIXQUANT_CACHE", str(root / "mqcache"))
    base = ["actquant", str(folder), "--text", str(root / "eval.txt"), "--calib", str(root / "calib.txt"),
            "--ctx", str(CTX), "--chunks", "1", "--calib-chunks", "1"]
    assert main(base + ["--schemes", "per-token,llm.int8", "--no-sensitivity", "--json", "--bits", "4"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["scheme"] for r in rows] == ["weights only (per-channel-int8)", "per-token", "llm.int8-6"]
    assert {"scheme", "ppl", "kld", "top1"} <= set(rows[1]) and "outlier_fraction" not in rows[1]
    assert "outlier_fraction" in rows[2] and rows[1]["bits"] == 4 and rows[1]["weights"] == "none"
    for extra, message in ((["--schemes", "foo"], "unknown scheme"),
                           (["--schemes", "percentile-0-sym"], "(0, 100]"),
                           (["--bits", "3"], "bits must be 4 or 8"),
                           (["--ctx", "4096"], "needs at least")):
        assert main(base + extra) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mixquant: error:") and message in err[0], err
    assert main(base[:4] + ["--calib", str(root / "eval.txt")] + base[6:]) == 1
    assert "must differ" in capsys.readouterr().err


# --- the real test model --------------------------------------------------------------------------


@pytest.mark.slow
def test_massive_activation_on_the_test_model(tmp_path):
    """SmolLM2's massive activation (channel 345 entering blk.11.ffn_down) is the widest input, and
    finer scales than per-tensor min/max recover most of the damage."""
    from mixquant.testdata import build_test_model, build_test_text

    model = build_test_model()
    calib, text = build_test_text()
    r = actquant(model, text, calib, schemes=["minmax-sym", "per-token", "block32"], ctx=256, chunks=1,
                 calib_chunks=2, sensitivity=False, threads=2, progress=False, cache=tmp_path)
    assert r.worst["key"] == "blk.11.ffn_down_in"
    assert int(np.argmax(r.worst["channel_absmax"])) == 345
    minmax, token, block = (r.row(s).kld for s in ("minmax-sym", "per-token", "block32"))
    assert block < token < minmax


def test_weights_plan_adds_to_the_activation_error(tiny):
    """--weights PLAN: the plan's weights (GGUF codecs) stay in the model for every row; SmoothQuant,
    which must scale weights before they are quantized, is skipped."""
    folder, root = tiny
    r = actquant(folder, root / "eval.txt", root / "calib.txt", schemes=["per-token", "smoothquant"],
                 weights="Q4_0", ctx=CTX, chunks=2, calib_chunks=2, sensitivity=False, cache=root / "cache",
                 progress=False)
    assert [x.scheme for x in r.rows] == ["weights only (Q4_0)", "per-token"]
    alone = actquant(folder, root / "eval.txt", root / "calib.txt", schemes=["per-token"], ctx=CTX, chunks=2,
                     calib_chunks=2, sensitivity=False, cache=root / "cache", progress=False).rows[0]
    both = r.rows[1]
    assert both.weights == "Q4_0" and both.kld > max(r.rows[0].kld, alone.kld)
