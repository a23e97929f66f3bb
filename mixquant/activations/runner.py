"""Forward pre-hooks on every decoder linear's input: calibrate static ranges, then run the model
with the inputs (and, for W8A8 schemes, the weights) fake-quantized.

The model is the `evaluate.Evaluator`'s transformers model (`ev.model`: every unit of its runtime
loaded, float32), so every result is scored against its cached float32 reference. Weights are never copied: a scheme that
changes them (SmoothQuant's column scales, int8 or Q8_0 rounding) registers a
`torch.nn.utils.parametrize` parametrization that recomputes the weight in each forward pass and
is removed afterwards, leaving the original parameter untouched.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch.nn.utils import parametrize

from ..arch import for_model
from ..calibrate import input_of
from ..errors import MixquantError
from . import schemes as sc
from .stats import InputStats, Range

__all__ = ["Site", "ActivationRunner", "WEIGHT_MODES"]

WEIGHT_MODES = ("none", "per-channel-int8", "Q8_0")  # rounded in the forward pass; anything else is a plan


@dataclass
class Site:
    """One decoder linear: its module, GGUF weight name and the input key it reads
    (`calibrate.input_of`: q/k/v share one, gate/up another)."""

    module: torch.nn.Linear
    name: str
    key: str


@dataclass
class Tally:
    """What a scheme did to the values while it ran: clipped values (static scales) or float
    columns weighted by the output features they feed (LLM.int8(): the share of the multiply-adds
    left in float)."""

    hits: float = 0.0
    total: float = 0.0
    per_key: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, hits: float, total: float) -> None:
        self.hits += hits
        self.total += total
        acc = self.per_key.setdefault(key, [0.0, 0.0])
        acc[0] += hits
        acc[1] += total

    @property
    def fraction(self) -> float | None:
        return self.hits / self.total if self.total else None


class _Scaled(torch.nn.Module):
    """weight -> weight * scale (broadcast): SmoothQuant's column scales, or a norm's 1/s."""

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.scale


class _Rounded(torch.nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.fn(w)


_WEIGHT_ROUNDING = {"per-channel-int8": sc.per_channel_weights, "Q8_0": sc.q8_0_weights}


class ActivationRunner:
    """Hooks for one Evaluator's model. bits: the activation grid (8 or 4)."""

    def __init__(self, ev, bits: int = 8) -> None:
        self.ev = ev
        self.bits = bits
        self.levels = sc.qmax(bits)
        model = ev.model
        weight_of = ev.linear_weights()
        self.sites: list[Site] = []
        for module in model.get_decoder().modules():
            if isinstance(module, torch.nn.Linear):
                name = weight_of.get(module)
                key = input_of(name) if name else None
                if key is not None and key != "output_in":
                    self.sites.append(Site(module, name, key))
        if not self.sites:
            raise MixquantError(f"{ev.folder}: no decoder linear maps to a GGUF blk.* weight")
        self.keys = list(dict.fromkeys(s.key for s in self.sites))
        self.norms = for_model(model).norms_before(model)  # SmoothQuant folds into these; other inputs: in the hook
        self.stats: dict[str, InputStats] = {}
        self._ranges: dict[tuple[str, str], Range] = {}  # (scheme, key) -> static range, once per input

    # -- calibration ------------------------------------------------------------------------

    def calibrate(self, windows: torch.Tensor, progress: bool = True) -> dict[str, InputStats]:
        """Run the float model over `windows` (n, ctx) and collect every input's `InputStats`."""
        from tqdm import tqdm

        stats = {k: InputStats(f"activations {k}") for k in self.keys}
        first = {}
        for s in self.sites:
            first.setdefault(s.key, s)

        def hook(key):
            return lambda _m, args: stats[key].add(args[0].detach())

        hooks = [s.module.register_forward_pre_hook(hook(k)) for k, s in first.items()]
        try:
            with torch.inference_mode():
                for i in tqdm(range(windows.shape[0]), desc="calibrate", unit="chunk", leave=False,
                              disable=not progress, file=sys.stderr):
                    self.ev.model(input_ids=windows[i : i + 1], use_cache=False, logits_to_keep=1)
        finally:
            for h in hooks:
                h.remove()
        self.stats = stats
        self._ranges.clear()
        return stats

    # -- SmoothQuant ------------------------------------------------------------------------

    def weight_absmax(self, key: str) -> torch.Tensor:
        """max |w_j| per input column over every linear reading `key`."""
        return torch.stack([s.module.weight.detach().abs().amax(dim=0) for s in self.sites if s.key == key]
                           ).amax(dim=0)

    def smoothing_scales(self, alpha: float) -> dict[str, torch.Tensor]:
        """s_j = max|x_j|^alpha / max|w_j|^(1 - alpha) per input (1 where a channel never fires)."""
        out = {}
        for key in self.keys:
            x = self.stats[key].channel_absmax.float()
            w = self.weight_absmax(key)
            s = x.pow(alpha) / w.clamp(min=1e-8).pow(1.0 - alpha)
            out[key] = torch.where((x > 0) & (s > 0), s, torch.ones_like(s)).clamp(min=1e-5)
        return out

    @contextmanager
    def smoothed(self, scales: dict[str, torch.Tensor]) -> Iterator[dict[str, bool]]:
        """The model with x_j / s_j at every input and w_j * s_j in its weights: folded into the
        preceding RMSNorm's gain where there is one, else divided in a pre-hook. Computes the same
        function as the float model (to rounding). Yields {key: folded}."""
        with ExitStack() as stack:
            folded = {}
            for key, s in scales.items():
                norm = self.norms.get(key)
                if norm is not None:
                    stack.enter_context(_parametrized(norm, _Scaled(1.0 / s)))
                    folded[key] = True
                else:
                    folded[key] = False
            for site in self.sites:
                if site.key in scales:
                    stack.enter_context(_parametrized(site.module, _Scaled(scales[site.key][None, :])))
                    if not folded[site.key]:
                        inv = 1.0 / scales[site.key]
                        stack.enter_context(_hooked(site.module, lambda m, args, inv=inv: (args[0] * inv, *args[1:])))
            yield folded

    # -- running a scheme ---------------------------------------------------------------------

    def _static_range(self, scheme: sc.Scheme, key: str, smoothing: torch.Tensor | None) -> Range:
        if smoothing is not None:  # per-tensor minmax of the smoothed input: max_j (max|x_j| / s_j)
            a = float((self.stats[key].channel_absmax.float() / smoothing).max())
            return Range(-a, a)
        if (scheme.name, key) not in self._ranges:
            self._ranges[scheme.name, key] = self.stats[key].range(scheme, self.bits)
        return self._ranges[scheme.name, key]

    def quantizer(self, scheme: sc.Scheme, key: str, tally: Tally, out_features: int,
                  smoothing: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """x -> fake-quantized x for one input under `scheme` (recording clipped values or float
        columns in `tally`)."""
        levels = self.levels
        if scheme.kind == "per-token" or (scheme.kind == "smoothquant" and scheme.granularity == "per-token"):
            return lambda x: sc.per_token(x, levels)
        if scheme.kind == "block32":
            return lambda x: sc.per_block(x, levels)
        if scheme.kind == "llm.int8":
            def int8(x):
                y, cols = sc.llm_int8(x, scheme.threshold, levels)
                tally.add(key, float(cols.sum()) * out_features, cols.numel() * out_features)
                return y
            return int8
        if not self.stats:
            raise MixquantError(f"{scheme.name}: static scales need a calibration pass first")
        r = self._static_range(scheme, key, smoothing)
        if r.per_channel is not None:
            amax = r.per_channel

            def channel(x):
                tally.add(key, float((x.abs() > amax).sum()), x.numel())
                return sc.symmetric(x, amax, levels)
            return channel
        if scheme.symmetric or scheme.kind == "smoothquant":
            amax = torch.tensor(r.hi)

            def sym(x):
                tally.add(key, float((x.abs() > amax).sum()), x.numel())
                return sc.symmetric(x, amax, levels)
            return sym
        lo, hi, bits = r.lo, r.hi, self.bits

        def asym(x):
            tally.add(key, float(((x < lo) | (x > hi)).sum()), x.numel())
            return sc.asymmetric(x, lo, hi, bits)
        return asym

    @contextmanager
    def applied(self, scheme: sc.Scheme | None, weights: str = "none",
                keys: Iterable[str] | None = None) -> Iterator[Tally]:
        """The model with `scheme` on the inputs in `keys` (default all; None: no activation
        rounding) and weights rounded per `weights` ("none", "per-channel-int8", "Q8_0"; "none"
        gives LLM.int8() and SmoothQuant their int8 weights; "plan": the model's weights as they are,
        e.g. a plan evaluate_plan left in place). Yields the run's Tally."""
        tally = Tally()
        keys = set(self.keys if keys is None else keys)
        if weights == "none" and scheme is not None and scheme.int8_weights:
            weights = "per-channel-int8"
        if weights == "plan" and scheme is not None and scheme.kind == "smoothquant":
            raise MixquantError(f"{scheme.name}: SmoothQuant scales the weights before they are quantized, "
                                "which a GGUF plan's weights (already quantized) cannot follow")
        with ExitStack() as stack:
            scales = None
            if scheme is not None and scheme.kind == "smoothquant":
                if not self.stats:
                    raise MixquantError(f"{scheme.name}: needs a calibration pass first")
                scales = self.smoothing_scales(float(scheme.alpha))
                stack.enter_context(self.smoothed(scales))
            if weights not in ("none", "plan"):  # "plan": the weights already in the model, as they are
                rounding = _WEIGHT_ROUNDING.get(weights)
                if rounding is None:
                    raise MixquantError(f"weights {weights!r}: expected one of {', '.join(WEIGHT_MODES)}")
                for site in self.sites:
                    stack.enter_context(_parametrized(site.module, _Rounded(rounding)))
            if scheme is not None:
                shared: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # q/k/v (gate/up) read one tensor
                for site in self.sites:
                    if site.key not in keys:
                        continue
                    fn = self.quantizer(scheme, site.key, tally, site.module.out_features,
                                        None if scales is None else scales[site.key])
                    stack.enter_context(_hooked(site.module, _pre_hook(site.key, fn, shared,
                                                                       scheme.kind == "llm.int8")))
            yield tally


def _pre_hook(key: str, fn, shared: dict, per_site: bool):
    def hook(_module, args):
        x = args[0]
        hit = shared.get(key)
        if hit is not None and hit[0] is x and not per_site:
            return (hit[1], *args[1:])
        y = fn(x)
        shared[key] = (x, y)
        return (y, *args[1:])
    return hook


@contextmanager
def _parametrized(module: torch.nn.Module, p: torch.nn.Module) -> Iterator[None]:
    """`p` applied to module.weight while inside; the stored parameter is never modified."""
    parametrize.register_parametrization(module, "weight", p, unsafe=True)
    try:
        yield
    finally:
        # remove only ours (the last), keeping any outer parametrization; restore the original on the last
        plist = module.parametrizations["weight"]
        if len(plist) > 1:
            del plist[-1]
        else:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


@contextmanager
def _hooked(module: torch.nn.Module, hook) -> Iterator[None]:
    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
