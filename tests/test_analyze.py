"""Sensitivity analysis extras (mixquant.analyze): the runner's NLL, the Fisher estimate, the layer
sweep, the sensitivity file's schema and the rank correlation helper, on a tiny random llama."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama
from transformers import AutoModelForCausalLM

from mixquant import formats
from mixquant.analyze import (
    SCHEMA,
    LayerResult,
    Sensitivity,
    TensorSensitivity,
    TypeCost,
    _Runner,
    analyze,
    rank_correlation,
)
from mixquant.errors import MixquantError
from mixquant.evaluate import unpermute_qk
from mixquant.source import open_source, permute_qk

SCORE_FROM = 8
# GGUF name -> transformers module path, for the tiny llama's block tensors
_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
       "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
       "ffn_down": "mlp.down_proj"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer GQA llama and 3 windows sampled from it: on its own samples the expected
    NLL increase of a perturbed model is its KLD, so perplexity must rise when the model is damaged."""
    folder = make_tiny_llama(tmp_path_factory.mktemp("tiny_analyze") / "model", vocab_size=300,
                             intermediate_size=256, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    torch.manual_seed(1)
    start = torch.randint(1, model.config.vocab_size, (3, 1))
    with torch.no_grad():
        windows = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, max_new_tokens=63,
                                 min_new_tokens=63, top_k=0, pad_token_id=0)
    return folder, model, windows


def _loss(model, windows) -> float:
    with torch.inference_mode():
        logits = model(input_ids=windows).logits[:, SCORE_FROM:-1]
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(),
                                                   windows[:, SCORE_FROM + 1:].reshape(-1)))


def _hf_param(model, name: str):
    _, layer, kind, _ = name.split(".")
    return model.get_parameter(f"model.layers.{layer}.{_HF[kind]}.weight")


def _to_hf(name: str, x: np.ndarray, config) -> np.ndarray:
    if ".attn_q." in name:
        return unpermute_qk(x, config.num_attention_heads)
    if ".attn_k." in name:
        return unpermute_qk(x, config.num_key_value_heads)
    return x


def _roundtrip(w: np.ndarray, typ: str) -> np.ndarray:
    return formats.dequantize(formats.quantize(w, typ), typ, w.shape)


# --------------------------------------------------------------------------------------------
# the runner's NLL


def test_runner_nll_is_the_models_loss_on_the_scored_tokens(tiny):
    _, model, windows = tiny
    runner = _Runner(model, windows, score_from=SCORE_FROM)
    assert runner.ref_nll == pytest.approx(_loss(model, windows), rel=1e-6)
    for start in (-1, 0, 1, 2):
        assert runner.score(start) == (0.0, pytest.approx(runner.ref_nll, rel=1e-6))
    p = model.model.layers[0].self_attn.v_proj.weight
    with torch.no_grad():
        saved = p.clone()
        p.add_(0.1 * torch.randn_like(p))
        kld, nll = runner.score(0)
        full = _loss(model, windows)
        p.copy_(saved)
    assert nll == pytest.approx(full, rel=1e-6)
    assert kld > 0 and nll != pytest.approx(runner.ref_nll, rel=1e-6)


# --------------------------------------------------------------------------------------------
# the Fisher estimate


def test_fisher_estimate(tiny):
    """Against an independent computation in GGUF orientation (the Fisher permuted like the
    weights), zero for F32 and norms, and larger for coarser types."""
    folder, model, windows = tiny
    names = ["blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.1.ffn_down.weight", "blk.0.attn_norm.weight"]
    sens = analyze(folder, None, windows=windows, score_from=SCORE_FROM, measure="none", fisher=True,
                   tensors=names, types=["Q8_0", "Q5_1", "Q4_0", "Q2_K"], progress=False, threads=1)
    assert sens.settings["fisher"] and sens.settings["seconds_fisher"] >= 0
    assert sens["blk.0.attn_norm.weight"].types["F32"].fisher == 0.0
    n_tokens = windows.shape[1] - 1 - SCORE_FROM
    params = [_hf_param(model, n) for n in names[:3]]
    fisher = [torch.zeros_like(p) for p in params]
    for window in windows:
        logits = model(input_ids=window[None]).logits[0, SCORE_FROM:-1]
        loss = torch.nn.functional.cross_entropy(logits, window[SCORE_FROM + 1:])
        for f, g in zip(fisher, torch.autograd.grad(loss, params)):
            f += n_tokens / len(windows) * g * g
    src = open_source(folder)
    cfg = model.config
    for name, f in zip(names[:3], fisher):
        f = f.numpy()
        if ".attn_q." in name:
            f = permute_qk(f, cfg.num_attention_heads)
        elif ".attn_k." in name:
            f = permute_qk(f, cfg.num_attention_heads, cfg.num_key_value_heads)
        w = src.tensor(name)
        types = sens[name].types
        assert types["F32"].fisher == 0.0
        for typ in ("Q8_0", "Q4_0"):
            expect = 0.5 * float((f.astype(np.float64) * (w - _roundtrip(w, typ)) ** 2).sum())
            assert types[typ].fisher == pytest.approx(expect, rel=1e-4)
        assert types["Q4_0"].fisher > types["Q5_1"].fisher > types["Q8_0"].fisher > 0
        assert all(c.measured is None for t, c in types.items() if t != "F32")
    assert sens["blk.1.ffn_down.weight"].types["Q2_K"].fisher > sens["blk.1.ffn_down.weight"].types["Q4_0"].fisher


# --------------------------------------------------------------------------------------------
# the layer sweep


def test_layer_sweep(tiny):
    folder, model, windows = tiny
    sens = analyze(folder, None, windows=windows, score_from=SCORE_FROM, measure="none",
                   layer_sweep_types=("Q4_0", "Q2_K"), tensors=["blk.0.attn_norm.weight"], progress=False, threads=1)
    ref = sens.reference
    assert ref["nll"] == pytest.approx(_loss(model, windows), rel=1e-6)
    assert ref["ppl"] == pytest.approx(math.exp(ref["nll"]))
    assert [(r.layer, r.type) for r in sens.layer_sweep] == [(0, "Q4_0"), (0, "Q2_K"), (1, "Q4_0"), (1, "Q2_K")]
    for r in sens.layer_sweep:
        assert set(r.types_used) == {f"blk.{r.layer}.{k}.weight" for k in _HF}
        # 64-wide rows take no 256-blocks: Q2_K falls back to Q4_0 except in ffn_down (256 wide)
        assert all(t == ("Q2_K" if r.type == "Q2_K" and "ffn_down" in n else "Q4_0") for n, t in r.types_used.items())
        assert r.kld > 0 and r.delta_ppl > 0
        assert r.ppl == pytest.approx(ref["ppl"] * (1 + r.delta_ppl))
    coarse = {r.layer: r for r in sens.layer_sweep if r.type == "Q2_K"}
    assert all(coarse[r.layer].kld > r.kld for r in sens.layer_sweep if r.type == "Q4_0")
    # one entry against a plain forward pass with the block's weights swapped
    src = open_source(folder)
    r = coarse[1]
    saved = {}
    with torch.no_grad():
        for name, typ in r.types_used.items():
            p = _hf_param(model, name)
            saved[name] = p.clone()
            p.copy_(torch.from_numpy(_to_hf(name, _roundtrip(src.tensor(name), typ), model.config)))
        nll = _loss(model, windows)
        for name, x in saved.items():
            _hf_param(model, name).copy_(x)
    assert r.ppl == pytest.approx(math.exp(nll), rel=1e-5)


# --------------------------------------------------------------------------------------------
# the file


def _synthetic() -> Sensitivity:
    t = TensorSensitivity("blk.0.attn_q.weight", (32, 64), {
        "F32": TypeCost(8192, 0.0, 0.0, 0.0), "Q8_0": TypeCost(2176, 1e-4, 2e-5, 1.5e-5),
        "Q4_0": TypeCost(1152, 1e-2, None, 3e-3)})
    n = TensorSensitivity("blk.0.attn_norm.weight", (64,), {"F32": TypeCost(256, 0.0, 0.0, None)}, fixed=True)
    sweep = [LayerResult(layer=0, type="Q4_0", kld=0.01, ppl=15.5, delta_ppl=0.0333,
                         types_used={"blk.0.attn_q.weight": "Q4_0"})]
    return Sensitivity({t.name: t, n.name: n}, model={"arch": "llama", "n_layer": 1}, settings={"windows": 2},
                       reference={"nll": math.log(15.0), "ppl": 15.0}, layer_sweep=sweep).fit()


def test_schema_2_round_trip(tmp_path):
    sens = _synthetic()
    path = sens.save(tmp_path / "sensitivity.json")
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA == "mixquant.sensitivity/2"
    assert data["reference"] == {"nll": math.log(15.0), "ppl": 15.0}
    assert data["tensors"]["blk.0.attn_q.weight"]["types"]["Q4_0"]["fisher"] == 3e-3
    assert data["tensors"]["blk.0.attn_norm.weight"]["types"]["F32"]["fisher"] is None
    assert data["layer_sweep"][0]["types_used"] == {"blk.0.attn_q.weight": "Q4_0"}
    back = Sensitivity.load(path)
    assert back == sens
    assert back.damage("blk.0.attn_q.weight", "Q4_0") == sens.damage("blk.0.attn_q.weight", "Q4_0")


def test_fitted_damage_scales_fisher_when_every_pair_has_it():
    sens = _synthetic()  # attn_q measured at Q8_0 only: 2e-5 = (4/3) x its Fisher 1.5e-5
    assert sens.basis == "fisher"
    assert sens.damage("blk.0.attn_q.weight", "Q4_0") == pytest.approx(3e-3 * 4 / 3)
    sens.tensors["blk.0.attn_q.weight"].types["Q4_0"].fisher = None  # one pair without: predicted error
    sens._basis = None
    sens.fit()
    assert sens.basis == "predicted"
    assert sens.damage("blk.0.attn_q.weight", "Q4_0") == pytest.approx(1e-2 * 0.2)


def test_schema_1_still_loads_and_others_are_rejected(tmp_path):
    data = _synthetic().to_dict()
    data["schema"] = "mixquant.sensitivity/1"
    del data["reference"], data["layer_sweep"]
    for t in data["tensors"].values():
        for c in t["types"].values():
            del c["fisher"]
    p = tmp_path / "old.json"
    p.write_text(json.dumps(data))
    old = Sensitivity.load(p)
    assert old.reference is None and old.layer_sweep == []
    assert all(c.fisher is None for t in old.tensors.values() for c in t.types.values())
    assert old["blk.0.attn_q.weight"].types["Q8_0"].measured == 2e-5
    data["schema"] = "mixquant.sensitivity/3"
    p.write_text(json.dumps(data))
    with pytest.raises(MixquantError, match="schema 'mixquant.sensitivity/3' is not supported") as err:
        Sensitivity.load(p)
    assert "\n" not in str(err.value)
    bad = _synthetic().to_dict()
    del bad["layer_sweep"][0]["kld"]
    p.write_text(json.dumps(bad))
    with pytest.raises(MixquantError, match="malformed"):
        Sensitivity.load(p)
    p.write_text(json.dumps({"schema": SCHEMA, "tensors": {"a": {"shape": [2, 32]}}}))
    with pytest.raises(MixquantError, match="malformed"):
        Sensitivity.load(p)
    p.write_text("not json")
    with pytest.raises(MixquantError, match="not JSON"):
        Sensitivity.load(p)


# --------------------------------------------------------------------------------------------
# rank correlation


def test_rank_correlation_with_ties():
    # scores 1, 2, 2, 3 (ranks 1, 2.5, 2.5, 4) against KLD ranks 1..4: rho = 4.5 / sqrt(4.5 * 5)
    cases = [("blk.0.attn_q.weight", "Q4_0", 1.0, 0.1), ("blk.0.attn_k.weight", "Q4_0", 2.0, 0.2),
             ("blk.0.attn_v.weight", "Q8_0", 2.0, 0.3), ("blk.0.ffn_up.weight", "Q8_0", 3.0, 0.4)]
    tensors = {}
    for name, typ, score, kld in cases:
        tensors[name] = TensorSensitivity(name, (32, 32), {
            "F32": TypeCost(4096, 0.0, 0.0, 0.0), typ: TypeCost(1000, score, kld, None if typ == "Q8_0" else -score),
            "Q5_0": TypeCost(704, 9.0, None, 9.0)})  # not measured: left out
    tensors["norm"] = TensorSensitivity("norm", (32,), {"F32": TypeCost(128, 0.0, 0.0, 0.0)}, fixed=True)
    sens = Sensitivity(tensors)
    c = rank_correlation(sens)
    assert c["kind"] == "predicted" and c["pairs"] == 4
    assert c["rho"] == pytest.approx(4.5 / math.sqrt(22.5))
    assert c["per_type"] == {"Q4_0": {"pairs": 2, "rho": pytest.approx(1.0)},
                             "Q8_0": {"pairs": 2, "rho": pytest.approx(1.0)}}
    assert rank_correlation(sens, types=["Q8_0"])["per_type"].keys() == {"Q8_0"}
    f = rank_correlation(sens, kind="fisher")  # Q8_0's Fisher not computed: only the Q4_0 pairs
    assert f["pairs"] == 2 and f["rho"] == pytest.approx(-1.0)
    one = rank_correlation(sens, types=["Q4_0"], kind="fisher")
    assert one["rho"] == pytest.approx(-1.0) and rank_correlation(Sensitivity({}))["rho"] is None
    with pytest.raises(MixquantError, match="unknown score"):
        rank_correlation(sens, kind="measured")
