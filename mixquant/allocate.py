"""One type per tensor under a size budget, minimising the summed per-tensor damage.

    alloc = allocate(sens, max_bytes=105_453_920 - overhead)     # or bpw=4.9, or file_bytes=..., overhead=...
    alloc.plan            # plan.Plan: tensor name -> type
    alloc.damage          # predicted total damage (sum of per-tensor damages, e.g. KLD nats/token)
    allocate(sens, max_damage=0.03)   # the dual: the smallest plan predicted to lose at most that

The problem is a multiple-choice knapsack: tensor i takes exactly one option k (a type) of
bytes b_ik and damage d_ik (from `analyze.Sensitivity.damage`); minimise sum d subject to
sum b <= budget. Damages add up (the usual first approximation: each tensor's quantization error
is small and they perturb the output nearly independently).

Solved in two ways, the better answer kept (`method="auto"`):

1. **Lagrangian relaxation** (`method="lagrange"`). For a price lambda per byte every tensor
   independently takes the option minimising d + lambda*b; only points of its lower convex hull
   in the (bytes, damage) plane can win. The total bytes fall as lambda rises, changing only at
   the hull's slopes, so lambda is found by bisection over the sorted slopes of all tensors: the
   smallest lambda whose choice fits. That choice is feasible and optimal for its own size; the
   relaxation's value (the same choice plus the fitting fraction of the next hull step) is a lower
   bound on the true optimum (`Allocation.lower_bound`). A greedy fill then spends what is left of
   the budget to the byte: repeatedly the upgrade (any option, hull or not) with the best damage
   reduction per extra byte that still fits.
2. **Exact dynamic programming** over bytes (`method="exact"`), used when it is cheap: every
   option's bytes above its tensor's cheapest option is a multiple of their greatest common
   divisor g (6,912 bytes on the test model), so the budget is at most a few tens of thousands of
   units of g and the DP (tensors x options x units) is exact and takes well under a second. When
   the budget spans more than `max_units` units of g, the DP runs on coarser units with every
   option's bytes rounded up (still feasible, within tensors x unit bytes of the optimum) and the
   greedy fill follows.

The dual problem, the smallest plan whose summed damage is at most a bound (`max_damage`,
`solve_min_bytes`), is solved by bisection on the byte budget with the solver above: the optimal
damage never grows with the budget, so the first budget whose optimum reaches the bound is the
smallest plan that does (exact whenever the DP is).

Budget: **tensor data bytes**, the number `plan.Plan.total_bytes` and llama-quantize's "quant size"
report; the GGUF header, metadata and tensor infos (about 1.8 MB on the test model, mostly the
tokenizer) come on top. `bpw` converts bits per weight over *all* tensors (llama-quantize's BPW,
`Plan.bits_per_weight`) to bytes; `file_bytes` targets a whole file given its `overhead` (e.g. an
exported file's `ExportResult.bytes - ExportResult.tensor_bytes`), allowing `alignment - 1` bytes of
padding per tensor.

Constraints: a tensor llama-quantize does not quantize (norms, 1-D tensors: `fixed` in the
sensitivity) keeps its type; `pinned` {name: type} fixes a tensor's type; `min_types` {name: type}
admits for a tensor only types with at least that type's bits per weight. The default,
`DEFAULT_MIN_TYPES`, keeps the token embedding and the output projection at 4.5 bits per weight
or more (Q4_0/IQ4_NL/Q4_K and up): the output layer's error reaches every logit directly and is
where a single-tensor measurement extrapolates least safely (llama.cpp's presets keep the output
at Q5_K or better; on a tied model that tensor is also the embedding). The floor costs nothing
where the embedding rows do not fit 256-blocks (the 32-block types start at 4.5 bpw anyway), and
on the test model the allocation never wants less. Pass `min_types={}` to lift it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import reduce
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import MixquantError

__all__ = [
    "DEFAULT_MIN_TYPES",
    "Allocation",
    "Solution",
    "allocate",
    "solve",
    "solve_min_bytes",
    "budget_bytes",
    "plan_damage",
]

DEFAULT_MIN_TYPES: dict[str, str] = {"token_embd.weight": "Q4_0", "output.weight": "Q4_0"}
DEFAULT_MAX_UNITS = 1 << 18
_GGUF_ALIGNMENT = 32


# --------------------------------------------------------------------------------------------
# the generic solver


@dataclass
class Solution:
    """choice[i]: the index of the option taken in group i."""

    choice: list[int]
    bytes: int
    damage: float
    lower_bound: float  # Lagrangian (LP relaxation) bound: no feasible choice has less damage
    lam: float  # the price per byte at which the Lagrangian choice fits
    lagrange_damage: float  # the Lagrangian choice after the greedy fill
    lagrange_bytes: int
    method: str  # which answer was kept: "exact", "dp-coarse" or "lagrange"


def _hull(b: np.ndarray, d: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of the points (b, d), cheapest first, damage strictly
    falling and the damage saved per byte strictly falling along it."""
    order = sorted(range(len(b)), key=lambda k: (b[k], d[k]))
    pareto: list[int] = []
    for k in order:
        if pareto and b[k] == b[pareto[-1]]:
            continue  # same bytes, no less damage
        if pareto and d[k] >= d[pareto[-1]]:
            continue  # dominated
        pareto.append(k)
    hull: list[int] = []
    for k in pareto:
        while len(hull) >= 2:
            i, j = hull[-2], hull[-1]
            # j is on or above the segment i -> k: drop it (cross product, in float64)
            if (d[j] - d[i]) * (b[k] - b[i]) >= (d[k] - d[i]) * (b[j] - b[i]):
                hull.pop()
            else:
                break
        hull.append(k)
    return hull


def _lagrange(groups_b: list[np.ndarray], groups_d: list[np.ndarray], budget: int):
    """The Lagrangian choice (hull points), its lambda and the LP lower bound."""
    choice = []
    segs = []  # (efficiency, group, to-index, delta bytes, delta damage)
    for gi, (b, d) in enumerate(zip(groups_b, groups_d)):
        h = _hull(b, d)
        choice.append(h[0])
        for j in range(1, len(h)):
            db = int(b[h[j]] - b[h[j - 1]])
            dd = float(d[h[j - 1]] - d[h[j]])
            segs.append((dd / db, gi, j, db, dd, h[j]))
    used = sum(int(b[c]) for b, c in zip(groups_b, choice))
    slack = budget - used
    # hull slopes fall along each hull, so sorting by efficiency keeps every group's steps in order
    segs.sort(key=lambda s: (-s[0], s[1], s[2]))
    cum = np.cumsum([s[3] for s in segs]) if segs else np.zeros(0, dtype=np.int64)
    # bisection on lambda over the sorted breakpoints: the longest prefix that fits
    n_take = int(np.searchsorted(cum, slack, side="right"))
    for s in segs[:n_take]:
        choice[s[1]] = s[5]
    taken = int(cum[n_take - 1]) if n_take else 0
    damage = float(sum(float(d[c]) for d, c in zip(groups_d, choice)))
    if n_take < len(segs):
        lam = segs[n_take][0]
        lower = damage - lam * (slack - taken)  # plus the fitting fraction of the critical step
    else:
        lam = 0.0
        lower = damage
    return choice, lam, lower


def _greedy_fill(groups_b, groups_d, choice: list[int], budget: int) -> list[int]:
    """Spend the rest of the budget: take the upgrade with the best damage saved per extra byte
    that still fits (free improvements first), until none fits."""
    choice = list(choice)
    flat_g = np.concatenate([np.full(len(b), gi) for gi, b in enumerate(groups_b)])
    flat_k = np.concatenate([np.arange(len(b)) for b in groups_b])
    flat_b = np.concatenate(groups_b).astype(np.int64)
    flat_d = np.concatenate(groups_d).astype(np.float64)
    used = sum(int(b[c]) for b, c in zip(groups_b, choice))
    while True:
        cur_b = np.array([groups_b[g][choice[g]] for g in range(len(groups_b))], dtype=np.int64)[flat_g]
        cur_d = np.array([groups_d[g][choice[g]] for g in range(len(groups_d))], dtype=np.float64)[flat_g]
        extra = flat_b - cur_b
        saved = cur_d - flat_d
        ok = (saved > 0) & (extra <= budget - used)
        if not ok.any():
            return choice
        score = np.where(extra > 0, saved / np.maximum(extra, 1), np.inf)
        score = np.where(ok, score, -np.inf)
        best = np.flatnonzero(score == score.max())
        m = best[np.argmax(saved[best])]  # among equals, the biggest saving
        g = int(flat_g[m])
        used += int(extra[m])
        choice[g] = int(flat_k[m])


def _unit(groups_b) -> int:
    """g: the gcd of every option's bytes above its group's cheapest (0 when no group has a choice
    of sizes). Every plan's size is the cheapest plan's plus a multiple of g."""
    return reduce(math.gcd, (int(x) for b in groups_b for x in b - b.min() if x > 0), 0)


def _dp(groups_b, groups_d, budget: int, max_units: int):
    """Exact (or, past max_units, rounded-up coarse) DP. Returns (choice, exact?)."""
    base = [int(b.min()) for b in groups_b]
    slack = budget - sum(base)
    deltas = [(b - bmin).astype(np.int64) for b, bmin in zip(groups_b, base)]
    g = _unit(groups_b)
    if g == 0:  # nothing has a choice of sizes
        return [int(np.argmin(d)) for d in groups_d], True
    exact = slack // g <= max_units
    unit = g if exact else -(-slack // max_units)
    cap = slack // unit
    weights = [(-(-dl // unit)).astype(np.int64) for dl in deltas]  # rounded up: never over budget
    dp = np.zeros(cap + 1, dtype=np.float64)
    keep = []  # (group, option indices considered, argmin table)
    fixed = {}
    for gi, (w, d) in enumerate(zip(weights, groups_d)):
        opts = [k for k in range(len(w)) if w[k] <= cap]
        # drop options dominated by a lighter-or-equal option with no more damage
        opts.sort(key=lambda k: (w[k], d[k]))
        kept = []
        for k in opts:
            if kept and d[k] >= d[kept[-1]]:
                continue
            kept.append(k)
        if len(kept) == 1:
            fixed[gi] = kept[0]
            dp += float(d[kept[0]])
            continue
        new = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, dtype=np.uint16)
        for j, k in enumerate(kept):
            wk = int(w[k])
            cand = np.full(cap + 1, np.inf)
            cand[wk:] = dp[: cap + 1 - wk] + float(d[k])
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        dp = new
        keep.append((gi, kept, arg))
    choice = [0] * len(groups_b)
    for gi, k in fixed.items():
        choice[gi] = k
    c = cap
    for gi, kept, arg in reversed(keep):
        k = kept[int(arg[c])]
        choice[gi] = k
        c -= int(weights[gi][k])
    return choice, exact


def _groups(options: Sequence[Sequence[tuple[int, float]]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each group's option bytes and damages as arrays, checked."""
    groups_b, groups_d = [], []
    for i, opts in enumerate(options):
        if not opts:
            raise MixquantError(f"group {i} has no option")
        b = np.array([int(o[0]) for o in opts], dtype=np.int64)
        d = np.array([float(o[1]) for o in opts], dtype=np.float64)
        if (b < 0).any() or not np.isfinite(d).all():
            raise MixquantError(f"group {i}: bytes must be non-negative and damage finite")
        groups_b.append(b)
        groups_d.append(d)
    return groups_b, groups_d


def _total(groups_b, groups_d, choice) -> tuple[int, float]:
    """(bytes, damage) of a choice, the damage summed in group order."""
    return (sum(int(b[c]) for b, c in zip(groups_b, choice)),
            float(sum(float(d[c]) for d, c in zip(groups_d, choice))))


def solve(
    options: Sequence[Sequence[tuple[int, float]]],
    budget: int,
    *,
    method: str = "auto",
    max_units: int = DEFAULT_MAX_UNITS,
) -> Solution:
    """The multiple-choice knapsack: options[i] = [(bytes, damage), ...] for group i; pick one per
    group, total bytes <= budget, minimal total damage. method: "auto" (both, the better kept),
    "lagrange" (relaxation + greedy fill) or "exact" (DP; rounded-up coarse units past max_units).
    Raises MixquantError when even the cheapest choice exceeds the budget."""
    if method not in ("auto", "lagrange", "exact"):
        raise MixquantError(f"method must be 'auto', 'lagrange' or 'exact', got {method!r}")
    if not options:
        return Solution([], 0, 0.0, 0.0, 0.0, 0.0, 0, "exact")
    groups_b, groups_d = _groups(options)
    budget = int(budget)
    smallest = sum(int(b.min()) for b in groups_b)
    if smallest > budget:
        raise MixquantError(f"the budget of {budget:,} bytes is below the smallest plan the constraints "
                            f"allow, {smallest:,} bytes")

    def total(choice):
        return _total(groups_b, groups_d, choice)

    lchoice, lam, lower = _lagrange(groups_b, groups_d, budget)
    lchoice = _greedy_fill(groups_b, groups_d, lchoice, budget)
    lb, ld = total(lchoice)
    best, how = lchoice, "lagrange"
    if method in ("auto", "exact"):
        dchoice, exact = _dp(groups_b, groups_d, budget, max_units)
        if not exact:
            dchoice = _greedy_fill(groups_b, groups_d, dchoice, budget)
        db, dd = total(dchoice)
        # exact: the optimum (ties: fewer bytes); coarse: only if it beats the Lagrangian answer
        if method == "exact" or dd < ld or (dd == ld and db <= lb):
            best, how = dchoice, "exact" if exact else "dp-coarse"
    nb, nd = total(best)
    assert nb <= budget
    return Solution(choice=list(best), bytes=nb, damage=nd, lower_bound=min(lower, nd), lam=lam,
                    lagrange_damage=ld, lagrange_bytes=lb, method=how)


def solve_min_bytes(
    options: Sequence[Sequence[tuple[int, float]]],
    max_damage: float,
    *,
    method: str = "auto",
    max_units: int = DEFAULT_MAX_UNITS,
) -> Solution:
    """The dual problem: the fewest bytes for a total damage of at most max_damage.

    Bisection on the byte budget with `solve`: the optimal damage does not grow with the budget,
    so the smallest budget whose optimum reaches the bound is the answer, and that optimum (ties
    go to fewer bytes) is the plan. Plan sizes are the cheapest plan's plus multiples of g
    (`_unit`), so the search runs over those only, between the cheapest plan and the cheapest of
    the least-damage plans: log2 of their distance in units of g solves (17 on the test model,
    about a second). Exact whenever `solve` is (its DP spans at most max_units units); otherwise
    the plan still keeps within the bound but may not be the smallest. Raises MixquantError,
    naming the smallest achievable damage, when no plan reaches the bound.
    """
    if not max_damage >= 0:
        raise MixquantError(f"the damage bound must be a non-negative number, got {max_damage}")
    if not options:
        return Solution([], 0, 0.0, 0.0, 0.0, 0.0, 0, "exact")
    groups_b, groups_d = _groups(options)
    # the least damage anywhere, at the fewest bytes: the top of the search, feasible by construction
    top = [min(range(len(b)), key=lambda k: (d[k], b[k])) for b, d in zip(groups_b, groups_d)]
    top_bytes, floor = _total(groups_b, groups_d, top)
    if floor > max_damage:
        raise MixquantError(f"no plan has a predicted damage of {max_damage:.5g} or less: the smallest these "
                            f"constraints allow is {floor:.5g}")
    best = Solution(top, top_bytes, floor, floor, 0.0, floor, top_bytes, "exact")
    smallest, g = sum(int(b.min()) for b in groups_b), _unit(groups_b) or 1
    # invariant: a budget of smallest + hi*g reaches the bound (best), smallest + lo*g does not
    lo, hi = -1, (top_bytes - smallest) // g
    while hi - lo > 1:
        mid = (lo + hi) // 2
        sol = solve(options, smallest + mid * g, method=method, max_units=max_units)
        if sol.damage <= max_damage:
            hi, best = mid, sol
        else:
            lo = mid
    return best


# --------------------------------------------------------------------------------------------
# budgets


def budget_bytes(
    n_elements: int,
    *,
    max_bytes: int | None = None,
    bpw: float | None = None,
    file_bytes: int | None = None,
    overhead: int | None = None,
    n_tensors: int = 0,
) -> int:
    """Tensor data bytes for exactly one of: max_bytes (tensor data itself), bpw (bits per weight
    over all `n_elements`), file_bytes (whole GGUF file, less `overhead` for the header and
    metadata and alignment-1 padding bytes for each of `n_tensors`)."""
    given = [x is not None for x in (max_bytes, bpw, file_bytes)]
    if sum(given) != 1:
        raise MixquantError("give exactly one budget: max_bytes (tensor data), bpw or file_bytes")
    if max_bytes is not None:
        out = int(max_bytes)
    elif bpw is not None:
        if not bpw > 0:
            raise MixquantError(f"bits per weight must be positive, got {bpw}")
        out = int(math.floor(float(bpw) * n_elements / 8))
    else:
        if overhead is None:
            raise MixquantError("a file-size budget needs overhead=: the GGUF header and metadata bytes "
                                "(a written file's size minus its tensor bytes; ~1.8 MB for the test model)")
        out = int(file_bytes) - int(overhead) - n_tensors * (_GGUF_ALIGNMENT - 1)
    if out <= 0:
        raise MixquantError(f"the budget leaves {out:,} bytes for tensor data")
    return out


# --------------------------------------------------------------------------------------------
# allocation over a sensitivity


@dataclass
class Allocation:
    """The chosen plan and what the allocator expects of it."""

    plan: Any  # plan.Plan
    damage: float  # predicted total damage: sum over tensors of Sensitivity.damage(name, type)
    bytes: int  # tensor data bytes (plan.total_bytes)
    budget: int
    lower_bound: float  # no plan within the budget has less predicted damage
    lam: float  # Lagrange multiplier: damage per byte at the margin
    lagrange_damage: float  # what relaxation + greedy fill alone reached
    method: str
    n_elements: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    max_damage: float | None = None  # the bound of a max_damage allocation (budget is then its bytes)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes / self.n_elements if self.n_elements else 0.0

    def __str__(self) -> str:
        counts = sorted(self.plan.type_counts().items(), key=lambda kv: -kv[1])
        types = ", ".join(f"{n} {t}" for t, n in counts)
        size = (f"{self.bytes:,} of {self.budget:,} bytes" if self.max_damage is None
                else f"{self.bytes:,} bytes, the least for damage <= {self.max_damage:.5g}")
        return (f"{size} ({self.bits_per_weight:.3f} bpw), predicted damage {self.damage:.5g} "
                f"(bound {self.lower_bound:.5g}, {self.method}); {types}")


def _bpw(type_name: str) -> float:
    from . import formats

    return formats.get(type_name).bits_per_weight


def allocate(
    sens: Any,
    *,
    max_bytes: int | None = None,
    bpw: float | None = None,
    file_bytes: int | None = None,
    overhead: int | None = None,
    max_damage: float | None = None,
    pinned: Mapping[str, str] | None = None,
    min_types: Mapping[str, str] | None = None,
    types: Sequence[str] | None = None,
    damage: str = "auto",
    method: str = "auto",
    max_units: int = DEFAULT_MAX_UNITS,
) -> Allocation:
    """Choose a type for every tensor of `sens` (an `analyze.Sensitivity`) within the budget (one of
    max_bytes / bpw / file_bytes+overhead, see `budget_bytes`), minimising the summed damage; or,
    with max_damage instead of a budget, the smallest plan whose summed damage is at most that
    (`solve_min_bytes`).

    pinned: {tensor: type} fixed choices (the type need not have been analysed; its damage then
        counts as 0). min_types: {tensor: type} floors in bits per weight (default
        DEFAULT_MIN_TYPES; {} for none; a name the model lacks is ignored, e.g. output.weight on a
        tied model). types: restrict the candidate types (fixed and pinned tensors excepted).
    damage: which damage to minimise ("auto", "fitted", "measured", "predicted": Sensitivity.damage).
    Raises MixquantError when the budget is below the smallest plan the constraints allow (the
    message gives that size), or when no plan reaches max_damage (the message gives the least
    damage possible).
    """
    from . import formats
    from .plan import Plan, tensor_bytes

    started = time.perf_counter()
    pinned = dict(pinned or {})
    min_types = dict(DEFAULT_MIN_TYPES if min_types is None else min_types)
    names = sens.names
    unknown = [n for n in pinned if n not in sens]
    if unknown:
        raise MixquantError(f"pinned tensor {unknown[0]!r} is not in the sensitivity")
    allowed = None if types is None else {formats.get(t).name for t in types}
    n_elements = sens.n_elements
    if max_damage is None:
        budget = budget_bytes(n_elements, max_bytes=max_bytes, bpw=bpw, file_bytes=file_bytes, overhead=overhead,
                              n_tensors=len(names))
    elif any(x is not None for x in (max_bytes, bpw, file_bytes)):
        raise MixquantError("give either a budget (max_bytes, bpw or file_bytes) or max_damage, not both")

    notes: list[str] = []
    opts_by_group: list[list[tuple[str, int, float]]] = []
    for name in names:
        t = sens[name]
        if t.fixed:
            (typ, cost), = t.types.items()
            if name in pinned and formats.get(pinned[name]).name != typ:
                raise MixquantError(f"tensor {name} is not quantized (kept as {typ}); it cannot be pinned to "
                                    f"{pinned[name]}")
            opts_by_group.append([(typ, cost.bytes, 0.0)])
            continue
        if name in pinned:
            try:
                typ = formats.get(pinned[name]).name
                nbytes = tensor_bytes(typ, t.shape)
            except ValueError as exc:
                raise MixquantError(f"pinned tensor {name}: {exc}") from None
            if typ in t.types:
                dmg = sens.damage(name, typ, damage)
            else:
                dmg = 0.0
                notes.append(f"{name} pinned to {typ}, which was not analysed: its damage counts as 0")
            opts_by_group.append([(typ, nbytes, dmg if np.isfinite(dmg) else 0.0)])
            continue
        opts = [o for o in sens.options(name, damage) if allowed is None or o[0] in allowed]
        floor = min_types.get(name)
        if floor is not None:
            fbits = _bpw(floor)
            opts = [o for o in opts if _bpw(o[0]) >= fbits]
        opts = [o for o in opts if np.isfinite(o[2])]
        if not opts:
            raise MixquantError(f"tensor {name}: no analysed type satisfies the constraints"
                                + (f" (at least {floor})" if floor else "")
                                + (f" (types {', '.join(sorted(allowed))})" if allowed is not None else ""))
        opts_by_group.append(opts)

    groups = [[(o[1], o[2]) for o in opts] for opts in opts_by_group]
    if max_damage is None:
        smallest = sum(min(o[1] for o in opts) for opts in opts_by_group)
        if smallest > budget:
            raise MixquantError(
                f"a budget of {budget:,} tensor bytes ({8 * budget / n_elements:.3f} bpw) is below the smallest "
                f"plan these constraints allow: {smallest:,} bytes ({8 * smallest / n_elements:.3f} bpw)")
        sol = solve(groups, budget, method=method, max_units=max_units)
    else:
        sol = solve_min_bytes(groups, max_damage, method=method, max_units=max_units)
        budget = sol.bytes
    chosen = {name: opts[k][0] for name, opts, k in zip(names, opts_by_group, sol.choice)}
    plan = Plan(types=chosen, shapes=sens.shapes)
    assert plan.total_bytes == sol.bytes <= budget, (plan.total_bytes, sol.bytes, budget)
    return Allocation(plan=plan, damage=sol.damage, bytes=sol.bytes, budget=budget, lower_bound=sol.lower_bound,
                      lam=sol.lam, lagrange_damage=sol.lagrange_damage, method=sol.method, n_elements=n_elements,
                      seconds=time.perf_counter() - started, notes=notes, max_damage=max_damage)


def plan_damage(sens: Any, plan: Any, how: str = "auto") -> dict[str, float]:
    """{tensor: predicted damage} of any plan (a preset's, a recipe's, an allocation's) under a
    sensitivity of the same model: `Sensitivity.damage`, NaN where the plan's type was not analysed.
    The sum is the predicted total that `Allocation.damage` reports, so plans compare directly."""
    out = {}
    for name, typ in plan.types.items():
        if name not in sens:
            raise MixquantError(f"the sensitivity has no tensor {name!r}: was it computed for another model?")
        if tuple(sens[name].shape) != tuple(plan.shapes[name]):
            raise MixquantError(f"the sensitivity's {name} has shape {sens[name].shape}, the model's "
                                f"{plan.shapes[name]}: was it computed for another model?")
        out[name] = sens.damage(name, typ, how) if typ in sens[name].types else math.nan
    return out
