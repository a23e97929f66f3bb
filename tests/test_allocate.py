"""Allocation (mixquant.allocate) and sensitivity analysis (mixquant.analyze).

The knapsack is checked against brute force on small random instances; the incremental KLD
runner against a plain transformers forward pass on a tiny random llama; and (slow) a small
analysis of the real test model. The sensitivity file's schema: tests/test_analyze.py.
"""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama, random_text

from mixquant.allocate import DEFAULT_MIN_TYPES, allocate, budget_bytes, plan_damage, solve, solve_min_bytes
from mixquant.analyze import Sensitivity, TensorSensitivity, TypeCost, analyze, candidate_types, predicted_error
from mixquant.errors import MixquantError
from mixquant.plan import tensor_bytes


# --------------------------------------------------------------------------------------------
# the knapsack solver


def _instance(rng, n_groups, n_opts, max_bytes=40, scale=1):
    groups = []
    for _ in range(n_groups):
        m = int(rng.integers(1, n_opts + 1))
        b = (rng.integers(1, max_bytes, m) * scale).tolist()
        d = (rng.random(m) * 10).tolist()
        groups.append(list(zip(b, d)))
    return groups


def _brute(groups, budget):
    best = (math.inf, None)
    for ks in itertools.product(*[range(len(g)) for g in groups]):
        b = sum(g[k][0] for g, k in zip(groups, ks))
        if b <= budget:
            d = sum(g[k][1] for g, k in zip(groups, ks))
            best = min(best, (d, b))
    return best


def _bounds(groups):
    return sum(min(o[0] for o in g) for g in groups), sum(max(o[0] for o in g) for g in groups)


@pytest.mark.parametrize("seed", range(40))
def test_exact_optimum_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    groups = _instance(rng, int(rng.integers(1, 6)), 5, scale=int(rng.choice([1, 7, 6912])))
    lo, hi = _bounds(groups)
    for budget in sorted({lo, hi, *rng.integers(lo, hi + 1, 4).tolist()}):
        best, _ = _brute(groups, budget)
        for method in ("auto", "exact"):
            sol = solve(groups, budget, method=method)
            assert sol.bytes <= budget
            assert sol.damage == pytest.approx(best, abs=1e-9)
            assert sum(g[k][0] for g, k in zip(groups, sol.choice)) == sol.bytes
            assert sum(g[k][1] for g, k in zip(groups, sol.choice)) == pytest.approx(sol.damage)
        lag = solve(groups, budget, method="lagrange")
        assert lag.bytes <= budget
        # the relaxation's value bounds the optimum from below; its greedy answer from above
        assert lag.lower_bound <= best + 1e-9
        assert lag.damage >= best - 1e-9


@pytest.mark.parametrize("seed", range(10))
def test_lagrange_gap_is_at_most_one_hull_step(seed):
    """Relaxation + fill is within the largest single-group damage step of the LP bound."""
    rng = np.random.default_rng(100 + seed)
    groups = _instance(rng, 30, 6, max_bytes=500)
    lo, hi = _bounds(groups)
    budget = int(rng.integers(lo, hi + 1))
    sol = solve(groups, budget, method="lagrange")
    step = max(max(o[1] for o in g) - min(o[1] for o in g) for g in groups)
    assert sol.lower_bound <= sol.damage <= sol.lower_bound + step + 1e-9
    exact = solve(groups, budget, method="exact")
    assert sol.lower_bound - 1e-9 <= exact.damage <= sol.damage + 1e-9


def test_budget_is_respected_to_the_byte():
    # the only good plan costs exactly the budget; one byte less forces the cheap option
    groups = [[(100, 5.0), (173, 1.0)], [(50, 2.0), (81, 0.5)]]
    assert solve(groups, 254).damage == pytest.approx(1.5)
    assert solve(groups, 254).bytes == 254
    sol = solve(groups, 253)
    assert sol.bytes <= 253 and sol.damage == pytest.approx(min(1.0 + 2.0, 5.0 + 0.5))
    for method in ("lagrange", "exact"):
        assert solve(groups, 254, method=method).bytes == 254


def test_damage_is_monotone_in_budget():
    rng = np.random.default_rng(7)
    groups = _instance(rng, 12, 6, max_bytes=300)
    lo, hi = _bounds(groups)
    previous = math.inf
    for budget in range(lo, hi + 1, max(1, (hi - lo) // 200)):
        sol = solve(groups, budget)
        assert sol.bytes <= budget
        assert sol.damage <= previous + 1e-12
        previous = sol.damage


def test_large_instance_is_fast_and_near_the_bound():
    rng = np.random.default_rng(3)
    groups = []
    for _ in range(272):
        b = np.sort(rng.integers(1, 3000, 12)) * 6912
        d = np.sort(rng.random(12))[::-1] * 1e-3
        groups.append(list(zip(b.tolist(), d.tolist())))
    lo, hi = _bounds(groups)
    sol = solve(groups, (lo + hi) // 2)
    assert sol.bytes <= (lo + hi) // 2
    assert sol.lower_bound <= sol.damage <= sol.lagrange_damage
    assert sol.damage - sol.lower_bound < 1e-3 * sol.damage + 1e-6


def test_coarse_dp_stays_feasible():
    rng = np.random.default_rng(5)
    groups = _instance(rng, 20, 6, max_bytes=10_000)
    lo, hi = _bounds(groups)
    budget = (lo + hi) // 2
    sol = solve(groups, budget, method="exact", max_units=64)  # forces rounded-up units
    assert sol.bytes <= budget
    assert sol.method in ("dp-coarse", "exact")
    assert sol.damage >= solve(groups, budget).damage - 1e-9


def test_infeasible_budget_names_the_smallest_size():
    groups = [[(10, 1.0), (20, 0.0)], [(5, 1.0)]]
    with pytest.raises(MixquantError, match=r"smallest plan .* 15 bytes"):
        solve(groups, 14)
    assert solve(groups, 15).choice == [0, 0]


def _brute_min_bytes(groups, max_damage):
    """(fewest bytes, their least damage) over the choices with damage <= max_damage."""
    best = (math.inf, math.inf)
    for ks in itertools.product(*[range(len(g)) for g in groups]):
        d = sum(g[k][1] for g, k in zip(groups, ks))
        if d <= max_damage:
            best = min(best, (sum(g[k][0] for g, k in zip(groups, ks)), d))
    return best


@pytest.mark.parametrize("seed", range(30))
def test_min_bytes_for_a_damage_bound_matches_brute_force(seed):
    rng = np.random.default_rng(200 + seed)
    groups = _instance(rng, int(rng.integers(1, 6)), 5, scale=int(rng.choice([1, 7, 6912])))
    floor = sum(min(o[1] for o in g) for g in groups)
    ceiling = sum(max(o[1] for o in g) for g in groups)
    for bound in [floor, ceiling, *rng.uniform(floor, ceiling, 4).tolist()]:
        nbytes, _ = _brute_min_bytes(groups, bound)
        sol = solve_min_bytes(groups, bound)
        assert sol.bytes == nbytes and sol.damage <= bound
        assert sum(g[k][0] for g, k in zip(groups, sol.choice)) == sol.bytes
        assert sum(g[k][1] for g, k in zip(groups, sol.choice)) == pytest.approx(sol.damage)


def test_unreachable_damage_bound_names_the_least_damage():
    groups = [[(10, 1.0), (20, 0.25)], [(5, 0.5)]]
    with pytest.raises(MixquantError, match=r"no plan has a predicted damage of 0.5 or less: the smallest these "
                                            r"constraints allow is 0.75"):
        solve_min_bytes(groups, 0.5)
    assert solve_min_bytes(groups, 0.75).choice == [1, 0]
    assert solve_min_bytes(groups, 10).choice == [0, 0]
    with pytest.raises(MixquantError, match="non-negative"):
        solve_min_bytes(groups, float("nan"))


# --------------------------------------------------------------------------------------------
# allocation over a sensitivity


def _synthetic_sensitivity(seed=0, n_layer=3):
    """Sensitivity of a small llama-shaped model: damage = scale x 2^(-bits), bytes from real sizes."""
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (256, 64), "output_norm.weight": (64,)}
    for i in range(n_layer):
        shapes[f"blk.{i}.attn_norm.weight"] = (64,)
        shapes[f"blk.{i}.attn_q.weight"] = (64, 64)
        shapes[f"blk.{i}.attn_v.weight"] = (32, 64)
        shapes[f"blk.{i}.ffn_down.weight"] = (64, 512)
    tensors = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            tensors[name] = TensorSensitivity(name, shape, {"F32": TypeCost(4 * shape[0], 0.0, 0.0)}, fixed=True)
            continue
        scale = float(rng.uniform(0.1, 10))
        types = {}
        for t in candidate_types(shape):
            from mixquant import formats

            bits = formats.get(t).bits_per_weight
            pred = 0.0 if t == "F32" else float(2.0 ** (-bits) * rng.uniform(0.8, 1.25))
            types[t] = TypeCost(tensor_bytes(t, shape), pred, None)
        types["Q4_0"].measured = scale * types["Q4_0"].predicted
        tensors[name] = TensorSensitivity(name, shape, types)
    sens = Sensitivity(tensors=tensors, model={"arch": "llama", "n_layer": n_layer}, settings={})
    return sens.fit()


def test_allocation_constraints_are_honoured():
    sens = _synthetic_sensitivity()
    q8 = sum(tensor_bytes("F32" if t.fixed else "Q8_0", t.shape) for t in sens.tensors.values())
    pinned = {"blk.1.attn_q.weight": "Q5_1"}
    alloc = allocate(sens, max_bytes=q8 * 2 // 3, pinned=pinned)
    plan = alloc.plan
    assert set(plan.types) == set(sens.names)
    assert plan.total_bytes == alloc.bytes <= alloc.budget == q8 * 2 // 3
    for name, t in sens.tensors.items():
        if t.fixed:
            assert plan.types[name] == "F32"
    assert plan.types["blk.1.attn_q.weight"] == "Q5_1"
    from mixquant import formats

    assert formats.get(plan.types["token_embd.weight"]).bits_per_weight >= 4.5
    assert alloc.damage == pytest.approx(sum(sens.damage(n, plan.types[n]) for n in sens.names if not sens[n].fixed))
    assert alloc.lower_bound <= alloc.damage + 1e-12
    # types restriction
    only = allocate(sens, max_bytes=q8, types=["Q8_0", "Q4_0", "F32"], min_types={})
    assert set(only.plan.types.values()) <= {"Q8_0", "Q4_0", "F32"}


def test_min_type_floor_and_its_override():
    sens = _synthetic_sensitivity()
    smallest = sum(min(c.bytes for c in t.types.values()) for t in sens.tensors.values())
    # ffn_down (512 columns) can go to Q2_K; token_embd (64 columns) can only go to 4.5 bpw anyway
    alloc = allocate(sens, max_bytes=smallest, min_types={})
    assert alloc.plan.types["blk.0.ffn_down.weight"] == "Q2_K"
    with pytest.raises(MixquantError, match="smallest plan"):
        allocate(sens, max_bytes=smallest, min_types={"blk.0.ffn_down.weight": "Q4_K"})
    floored = allocate(sens, max_bytes=smallest + 10**6, min_types={"blk.0.ffn_down.weight": "Q5_0"})
    from mixquant import formats

    assert formats.get(floored.plan.types["blk.0.ffn_down.weight"]).bits_per_weight >= 5.5
    assert DEFAULT_MIN_TYPES["token_embd.weight"] == "Q4_0"


def test_infeasible_allocation_reports_the_smallest_size():
    sens = _synthetic_sensitivity()
    with pytest.raises(MixquantError, match=r"below the smallest plan these constraints allow: [\d,]+ bytes \([\d.]+ bpw\)"):
        allocate(sens, bpw=1.0)
    with pytest.raises(MixquantError, match="pinned tensor 'nope'"):
        allocate(sens, bpw=8, pinned={"nope": "Q8_0"})
    with pytest.raises(MixquantError, match="not quantized"):
        allocate(sens, bpw=8, pinned={"output_norm.weight": "Q8_0"})


def test_budget_conversions():
    assert budget_bytes(1000, bpw=8) == 1000
    assert budget_bytes(1000, max_bytes=123) == 123
    assert budget_bytes(1000, file_bytes=5000, overhead=1000, n_tensors=2) == 5000 - 1000 - 62
    with pytest.raises(MixquantError, match="overhead"):
        budget_bytes(1000, file_bytes=5000)
    with pytest.raises(MixquantError, match="exactly one"):
        budget_bytes(1000, bpw=4, max_bytes=10)
    sens = _synthetic_sensitivity()
    alloc = allocate(sens, bpw=5.0)
    assert alloc.bits_per_weight <= 5.0
    assert alloc.budget == math.floor(5.0 * sens.n_elements / 8)


def test_more_budget_never_hurts_the_allocation():
    sens = _synthetic_sensitivity(seed=4)
    previous = math.inf
    for bpw in np.linspace(4.6, 9, 12):
        alloc = allocate(sens, bpw=float(bpw))
        assert alloc.damage <= previous + 1e-15
        previous = alloc.damage


def test_max_damage_allocation_is_the_smallest_plan_within_the_bound():
    sens = _synthetic_sensitivity(seed=4)
    middle = allocate(sens, bpw=6.0)
    alloc = allocate(sens, max_damage=middle.damage)
    assert alloc.damage <= middle.damage and alloc.bytes <= middle.bytes
    assert alloc.budget == alloc.bytes == alloc.plan.total_bytes and "the least for damage <=" in str(alloc)
    # one byte less and the best plan does more damage
    assert allocate(sens, max_bytes=alloc.bytes - 1).damage > middle.damage
    assert sum(plan_damage(sens, alloc.plan).values()) == pytest.approx(alloc.damage)
    pinned = {n: "Q4_0" for n in sens.names if not sens[n].fixed}
    least = sum(sens.damage(n, "Q4_0") for n in pinned)
    with pytest.raises(MixquantError, match=f"the smallest these constraints allow is {least:.5g}"):
        allocate(sens, max_damage=least / 2, pinned=pinned)
    with pytest.raises(MixquantError, match="not both"):
        allocate(sens, max_damage=1.0, bpw=5)


def test_plan_damage_of_any_plan():
    from mixquant.plan import Plan

    sens = _synthetic_sensitivity()
    types = {n: ("F32" if sens[n].fixed else "Q8_0") for n in sens.names}
    damage = plan_damage(sens, Plan(types=types, shapes=sens.shapes))
    assert damage["output_norm.weight"] == 0.0
    assert damage["blk.0.attn_q.weight"] == sens.damage("blk.0.attn_q.weight", "Q8_0")
    types["blk.0.attn_q.weight"] = "Q2_K"  # 64 columns: never analysed
    assert math.isnan(plan_damage(sens, Plan(types=types, shapes=sens.shapes))["blk.0.attn_q.weight"])
    with pytest.raises(MixquantError, match="another model"):
        plan_damage(sens, Plan(types={"blk.9.attn_q.weight": "Q8_0"}, shapes={"blk.9.attn_q.weight": (64, 64)}))
    with pytest.raises(MixquantError, match="has shape"):
        plan_damage(sens, Plan(types={"blk.0.attn_q.weight": "Q8_0"}, shapes={"blk.0.attn_q.weight": (64, 128)}))


# --------------------------------------------------------------------------------------------
# the damage model


def test_damage_uses_measured_then_fitted_then_category_scale():
    t1 = TensorSensitivity("blk.0.attn_q.weight", (32, 32), {
        "Q4_0": TypeCost(576, 0.01, 0.002), "Q8_0": TypeCost(1088, 0.0001, None), "F32": TypeCost(4096, 0.0, 0.0)})
    t2 = TensorSensitivity("blk.1.attn_q.weight", (32, 32), {
        "Q4_0": TypeCost(576, 0.02, None), "F32": TypeCost(4096, 0.0, 0.0)})
    sens = Sensitivity({t1.name: t1, t2.name: t2}).fit()
    assert t1.scale == pytest.approx(0.2)
    assert sens.damage(t1.name, "Q4_0") == 0.002
    assert sens.damage(t1.name, "Q8_0") == pytest.approx(0.2 * 0.0001)
    assert t2.scale is None and sens.damage(t2.name, "Q4_0") == pytest.approx(0.2 * 0.02)  # the category's
    assert sens.damage(t1.name, "Q4_0", "predicted") == 0.01
    assert math.isnan(sens.damage(t1.name, "Q8_0", "measured"))
    with pytest.raises(MixquantError, match="not analysed"):
        sens.damage(t1.name, "Q2_K")


def test_type_factors_carry_a_consistent_departure_and_ignore_noise():
    """Three attn_v tensors measured at all types: Q5_1 consistently does 4x less damage per unit of
    predicted error than the probe Q4_0 (kept), Q5_0 scatters around 1 (shrunk away); a fourth,
    probe-only tensor inherits the Q5_1 factor."""
    def tensor(name, r40, r51=None, r50=None):
        types = {"Q4_0": TypeCost(576, 0.01, 0.01 * r40), "Q5_1": TypeCost(768, 0.004, None if r51 is None else 0.004 * r51),
                 "Q5_0": TypeCost(704, 0.005, None if r50 is None else 0.005 * r50), "F32": TypeCost(4096, 0.0, 0.0)}
        return TensorSensitivity(name, (32, 32), types)

    ts = [tensor("blk.0.attn_v.weight", 1.0, 0.25, 1.5), tensor("blk.1.attn_v.weight", 2.0, 0.52, 1.4),
          tensor("blk.2.attn_v.weight", 0.5, 0.124, 0.2), tensor("blk.3.attn_v.weight", 3.0)]
    sens = Sensitivity({t.name: t for t in ts}).fit()
    f = sens.type_factors["attn_v"]
    assert f["Q4_0"] == 1.0
    assert f["Q5_1"] == pytest.approx(0.25, rel=0.05)
    assert f["Q5_0"] == 1.0  # +0.4, +0.34, -0.92 in log: shrunk to nothing
    probe_only = "blk.3.attn_v.weight"
    assert sens[probe_only].scale == pytest.approx(3.0)
    assert sens.damage(probe_only, "Q5_1") == pytest.approx(3.0 * f["Q5_1"] * 0.004)
    assert sens.damage(probe_only, "Q5_0") == pytest.approx(3.0 * 0.005)
    report = sens.fit_report()
    assert report["pairs"] == 6 and report["tensors"] == 3
    back = Sensitivity.from_dict(json.loads(json.dumps(sens.to_dict())))
    assert back.type_factors == sens.type_factors
    assert back.damage(probe_only, "Q5_1") == sens.damage(probe_only, "Q5_1")


def test_predicted_error():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    assert predicted_error(w, w, None) == 0.0
    assert predicted_error(w, np.zeros_like(w), None) == pytest.approx(1.0)
    imp = np.zeros(64, dtype=np.float32)
    imp[:32] = 1
    q = w.copy()
    q[:, 32:] = 0  # error only where the importance is zero
    assert predicted_error(w, q, imp) == 0.0
    assert candidate_types((10, 64)) and "Q4_K" not in candidate_types((10, 64))
    assert "Q4_K" in candidate_types((10, 512))


# --------------------------------------------------------------------------------------------
# the analysis on a tiny random llama (fast) and on the real model (slow)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer GQA llama (HF folder) and a text file for it."""
    root = tmp_path_factory.mktemp("tiny_alloc")
    folder = make_tiny_llama(root / "model", vocab_size=300, intermediate_size=256, tie_word_embeddings=True)
    text = root / "calib.txt"
    text.write_text(random_text(2000, 1))
    return folder, text


def test_runner_reproduces_the_full_forward_pass(tiny):
    from transformers import AutoModelForCausalLM

    from mixquant.analyze import _Runner

    folder, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    windows = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    runner = _Runner(model, windows, score_from=10)
    with torch.inference_mode():
        full = model(input_ids=windows).logits[:, 10:39].reshape(-1, model.config.vocab_size)
    torch.testing.assert_close(runner.ref, full, rtol=1e-5, atol=1e-5)
    for start in (-1, 0, 1, 2):
        assert runner.score(start)[0] == 0.0
    # a perturbed weight: the rerun agrees with a full forward's KLD
    p = model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        saved = p.clone()
        p.add_(0.05 * torch.randn_like(p))
        kl_inc = runner.score(1)[0]
        with torch.inference_mode():
            logq = torch.log_softmax(model(input_ids=windows).logits[:, 10:39].double(), -1).reshape(full.shape)
        logp = torch.log_softmax(full.double(), -1)
        kl_full = float((logp.exp() * (logp - logq)).sum(-1).mean())
        p.copy_(saved)
    assert kl_inc == pytest.approx(kl_full, rel=1e-3)
    assert kl_inc > 0
    assert runner.score(1)[0] == 0.0


def test_analysis_of_a_tiny_model_allocates(tiny, tmp_path):
    from mixquant.source import open_source

    folder, text = tiny
    src = open_source(folder)
    sens = analyze(src, None, text=text, n_windows=2, ctx=48, measure="all", progress=False, threads=1)
    assert set(sens.names) == {t.name for t in src.model.tensors}
    assert sens.settings["tokens"] == 2 * (48 - 1 - 48 // 8)
    for _name, t in sens.tensors.items():
        if t.fixed:
            continue
        assert {"F32", "F16", "Q8_0", "Q4_0"} <= set(t.types)
        assert all(c.measured is not None for c in t.types.values())
        assert t.types["Q4_0"].measured > t.types["Q8_0"].measured > 0
        assert t.types["Q4_0"].predicted > t.types["Q8_0"].predicted > 0
        assert t.scale and t.scale > 0
    back = Sensitivity.load(sens.save(tmp_path / "sensitivity.json"))
    assert back.to_dict() == sens.to_dict()
    budget = sum(tensor_bytes("F32" if t.fixed else "Q5_0", t.shape) for t in sens.tensors.values())
    alloc = allocate(back, max_bytes=budget)
    assert alloc.plan.total_bytes <= budget
    assert set(alloc.plan.types) == set(sens.names)


def test_probe_mode_measures_the_probe_types(tiny):
    folder, text = tiny
    sens = analyze(folder, None, text=text, n_windows=1, ctx=48, measure="probe", validate=[],
                   tensors=["blk.0.attn_q.weight", "blk.1.ffn_down.weight", "blk.0.attn_norm.weight"],
                   progress=False, threads=1)
    assert set(sens.names) == {"blk.0.attn_q.weight", "blk.1.ffn_down.weight", "blk.0.attn_norm.weight"}
    assert sens["blk.0.attn_norm.weight"].fixed
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight"):
        measured = [t for t, c in sens[name].types.items() if c.measured is not None and t != "F32"]
        assert sorted(measured) == ["Q4_0", "Q5_1"]
        assert sens.damage(name, "Q8_0") == pytest.approx(sens[name].scale * sens[name].types["Q8_0"].predicted)
        assert sens.damage(name, "Q5_1") == sens[name].types["Q5_1"].measured
    with pytest.raises(MixquantError, match="measure must be"):
        analyze(folder, None, text=text, measure="some")


@pytest.mark.slow
def test_real_model_kld_grows_as_bits_shrink():
    from mixquant.calibrate import compute_imatrix
    from mixquant.testdata import build_test_model, build_test_text
    from mixquant.text import read_text

    folder = build_test_model()
    calib, _ = build_test_text()
    imatrix = compute_imatrix(folder, read_text(calib), ctx=128, chunks=2, progress=False)
    names = ["blk.29.ffn_down.weight", "blk.15.attn_v.weight"]
    sens = analyze(folder, imatrix, text=calib, n_windows=1, ctx=128, measure="all", tensors=names,
                   types=["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0", "Q8_0"], progress=False)
    down = sens["blk.29.ffn_down.weight"].types
    chain = [down[t].measured for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")]
    assert all(a > b for a, b in zip(chain, chain[1:])), chain
    v = sens["blk.15.attn_v.weight"].types
    assert "Q4_K" not in v  # 576 columns: no 256-blocks
    assert v["Q4_0"].measured > v["Q5_0"].measured > v["Q8_0"].measured > 0
    report = sens.fit_report()
    assert report["within_factor_2"] >= 0.6
