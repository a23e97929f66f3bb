"""Windows of token ids through a `StreamedModel`, block-major: the embedding loaded once and every
window embedded, then each decoder block loaded once and every window run through it, the hidden
states in between kept in a `HiddenStates` (spilled to disk beyond their share of the budget). Each
window is its own call, so every value is bit for bit what transformers' forward of that window
computes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .states import HiddenStates

if TYPE_CHECKING:
    import torch

    from .model import StreamedModel

__all__ = ["run_windows", "states_allowance"]


def states_allowance(model: StreamedModel) -> int:
    """Bytes of the budget left to hidden states: what the weights do not hold (all of them when
    resident, else the largest unit and its working memory)."""
    held = model.weight_bytes if model.resident else model.min_budget
    return max(0, model.budget - held)


def run_windows(model: StreamedModel, windows: torch.Tensor, *, allowance: int | None = None,
                folder: str | Path | None = None, desc: str = "blocks", progress: bool = False) -> HiddenStates:
    """Token ids (n, ctx) through the embedding and every decoder block (not the final norm):
    the last block's output of every window, float32, in a HiddenStates the caller closes.
    allowance: bytes the states may take in RAM (default `states_allowance(model)`)."""
    import torch
    from tqdm import tqdm

    n, ctx = (int(s) for s in windows.shape)
    states = None
    try:
        # units load outside inference mode: their parameters stay ordinary tensors, which callers
        # may parametrize (mixquant.activations) while the model is resident
        with model.loaded("embed") as (embed,), torch.inference_mode():
            for i in range(n):
                h = embed(windows[i : i + 1].to(model.device))
                if states is None:
                    states = HiddenStates((n, ctx, h.shape[-1]),
                                          states_allowance(model) if allowance is None else allowance, folder)
                    kwargs = model.block_kwargs(h, torch.arange(ctx, device=model.device)[None])
                states.set(slice(i, i + 1), h)
        assert states is not None
        for il in tqdm(range(model.n_layer), desc=desc, unit="block", leave=False, disable=not progress,
                       file=sys.stderr):
            with model.loaded(f"blk.{il}"), torch.inference_mode():
                for i in range(n):
                    rows = slice(i, i + 1)
                    states.set(rows, model.layer(il, states.get(rows).to(model.device, model.dtype), kwargs[il]))
    except BaseException:
        if states is not None:
            states.close()
        raise
    return states
