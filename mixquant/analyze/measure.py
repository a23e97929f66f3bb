"""The measurement, on the streaming runtime: the float32 reference pass with the hidden state
entering every block kept (`Reference`), the damage of candidate weights carried through the rest
of the model together (`Measurer.measure`), and the empirical Fisher diagonal by a walk back
through the blocks (`Measurer.fisher`).

Batched candidates (after ExLlamaV3's measure pass): every candidate whose weights live in block b
starts from the cached input of block b; from there on the candidates that differ only upstream
share each block's weights, so their hidden states run through a block in one call (a batch of k x
n windows: k times the rows per matrix product, which is what small models are starved of on a
CPU) and each block is loaded once per chunk of candidates instead of once per candidate.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import MixquantError
from ..plan import layer_of
from ..runtime import StreamedModel, Values

if TYPE_CHECKING:
    import torch

    from ..arch import Adapter
    from ..source import Source

Swap = dict[str, Values]  # GGUF name -> values in GGUF orientation, in place of the float32 ones

# hidden states of candidates in flight take at most this share of the budget left after the weights
_STATES_SHARE = 0.5


def unit_of(name: str, n_layer: int) -> int:
    """Where tensor `name` enters the model: its block; -1 (the embeddings) for token_embd; n_layer
    (the final norm and output projection) for output and output_norm."""
    il = layer_of(name)
    if il is not None:
        return il
    if name.startswith("token_embd"):
        return -1
    if name.startswith("output"):
        return n_layer
    raise MixquantError(f"cannot tell where tensor {name} enters the model")


def kld_nll(now, ref, p, targets) -> tuple[float, float]:
    """(mean KLD against the reference, mean NLL of `targets`) of logits `now` (n, vocab; consumed).
    KL(p_ref || p_now) without cancellation: with d = ref - now and c = E_p[d],
    KL = log1p(E_p[expm1(c - d)])."""
    import torch

    d = now
    nll = float((torch.logsumexp(d, dim=-1) - d.gather(1, targets[:, None])[:, 0]).double().mean())
    d.neg_().add_(ref)  # d = ref - now
    c = torch.einsum("nv,nv->n", p, d)
    d.neg_().add_(c[:, None]).expm1_()  # expm1(c - d)
    kl = torch.log1p(torch.einsum("nv,nv->n", p, d).double())
    return float(kl.clamp_min(0).mean()), nll


@dataclass
class Reference:
    """The float32 pass over the measurement windows: the input of every block (`inputs[i]`;
    `inputs[n_layer]` leaves the last block), the float32 logits of the scored positions and their
    mean NLL. Picklable (numpy arrays), so it can go to other processes once."""

    windows: np.ndarray  # (n, ctx) token ids
    score_from: int  # first scored position of each window
    inputs: list[np.ndarray]  # (n, ctx, n_embd) float32, n_layer + 1 of them
    logits: np.ndarray  # (n_scored, n_vocab) float32
    nll: float

    @property
    def n_scored(self) -> int:
        return int(self.logits.shape[0])

    @property
    def targets(self) -> np.ndarray:
        return np.ascontiguousarray(self.windows[:, self.score_from + 1:].reshape(-1))


class Measurer:
    """The damage of swapped weights, measured on `reference`'s windows by `model`."""

    def __init__(self, model: StreamedModel, reference: Reference):
        import torch

        self.model = model
        self.ref = reference
        self.n_layer = model.n_layer
        self._kwargs: dict[int, list[dict[str, Any]]] = {}
        ref = torch.from_numpy(reference.logits)
        self._ref = ref
        self._p = torch.softmax(ref.double(), dim=-1).float()
        self._targets = torch.from_numpy(reference.targets)

    # -- the pieces of a pass --------------------------------------------------------------

    def kwargs(self, batch: int) -> list[dict[str, Any]]:
        """Each block's call arguments for `batch` windows (masks and rotary tables depend on it)."""
        import torch

        if batch not in self._kwargs:
            t = self.ref.windows.shape[1]
            dummy = torch.zeros((batch, t, 1), dtype=self.model.dtype, device=self.model.device)
            pos = torch.arange(t, device=self.model.device).unsqueeze(0).expand(batch, -1)
            self._kwargs[batch] = self.model.block_kwargs(dummy, pos)
        return self._kwargs[batch]

    def _run_block(self, i: int, h: torch.Tensor, windows_per_call: int) -> torch.Tensor:
        """Block `i` (loaded) on hidden states (b, t, e), in calls of at most windows_per_call."""
        import torch

        outs = []
        for s in range(0, h.shape[0], windows_per_call):
            x = h[s:s + windows_per_call].to(self.model.device, self.model.dtype)
            outs.append(self.model.layer(i, x, self.kwargs(x.shape[0])[i]).float().to("cpu"))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def score(self, h: torch.Tensor) -> tuple[float, float]:
        """(mean KLD, mean NLL) of the final hidden states h (n, t, e) against the reference (the
        head loaded; `kld_nll`)."""

        d = self.model.logits(h[:, self.ref.score_from:-1].to(self.model.device, self.model.dtype))
        return kld_nll(d.reshape(-1, d.shape[-1]).to("cpu"), self._ref, self._p, self._targets)

    @contextmanager
    def _swapped(self, unit: str, swap: Swap) -> Iterator[None]:
        """The loaded `unit` with the swap's tensors that live in it in place; put back after."""
        names = [name for name in swap if name in self.model.tensors_of(unit)]
        try:
            self.model.assign(unit, {name: swap[name] for name in names})
            yield
        finally:
            self.model.restore(unit, names)

    def _touches(self, unit: str, swap: Swap) -> bool:
        return any(name in self.model.tensors_of(unit) for name in swap)

    def _last_unit(self, name: str) -> str:
        """The last unit whose pass reads tensor `name` (a tied token embedding: the head's)."""
        u = unit_of(name, self.n_layer)
        if u < 0:
            return "head" if self.model.info.tied_output else "embed"
        return "head" if u >= self.n_layer else f"blk.{u}"

    def _drop_done(self, unit: str, chunk: list[Swap]) -> None:
        """Free the candidates' values that no unit after `unit` reads."""
        for swap in chunk:
            for name in [n for n in swap if self._last_unit(n) == unit]:
                del swap[name]

    # -- the measurement -------------------------------------------------------------------

    def chunk_size(self, swap_bytes: int) -> int:
        """How many candidates fit in flight at once: each holds its hidden states (n, t, e) and
        its swapped weights."""
        n, t = self.ref.windows.shape
        e = self.ref.inputs[0].shape[-1]
        free = self.model.budget - (self.model.weight_bytes if self.model.resident else self.model.min_budget)
        per = 4 * n * t * e + swap_bytes
        return max(1, int(free * _STATES_SHARE) // max(per, 1))

    def measure(self, start: int, swaps: Sequence[Callable[[], Swap]], swap_bytes: int,
                progress: Any = None) -> list[tuple[float, float]]:
        """(KLD, NLL) of each swap, all of whose tensors enter at or after unit `start` (-1: the
        embeddings, 0..n_layer-1: a block, n_layer: the head), rerun from there. The swaps are made
        (`swaps[i]()`, at most `swap_bytes` each) a chunk at a time, as many as the budget holds
        in flight, and dropped after their chunk."""
        import torch

        out: list[tuple[float, float]] = []
        if not swaps:
            return out
        k = self.chunk_size(swap_bytes)
        n = self.ref.windows.shape[0]
        # a block call on up to 16 windows (of k x n in flight): enough rows for an efficient product
        per_call = max(n, 16)
        ids = torch.from_numpy(self.ref.windows)
        for c0 in range(0, len(swaps), k):
            chunk = [make() for make in swaps[c0:c0 + k]]
            with torch.inference_mode():
                if start < 0:
                    states = []
                    with self.model.loaded("embed"):
                        for s in chunk:
                            with self._swapped("embed", s):
                                states.append(self.model.embed(ids).float().to("cpu"))
                    self._drop_done("embed", chunk)
                    first = 0
                else:
                    base = torch.from_numpy(self.ref.inputs[min(start, self.n_layer)])
                    states = [base] * len(chunk)
                    first = start
                for i in range(first, self.n_layer):
                    unit = f"blk.{i}"
                    with self.model.loaded(unit):
                        own = [j for j, s in enumerate(chunk) if self._touches(unit, s)]
                        for j in own:
                            with self._swapped(unit, chunk[j]):
                                states[j] = self._run_block(i, states[j], per_call)
                        shared = [j for j in range(len(chunk)) if j not in set(own)]
                        if shared:
                            h = self._run_block(i, torch.cat([states[j] for j in shared]), per_call)
                            for m, j in enumerate(shared):
                                states[j] = h[m * n:(m + 1) * n]
                    self._drop_done(unit, chunk)
                with self.model.loaded("head"):
                    for j, s in enumerate(chunk):
                        with self._swapped("head", s):
                            out.append(self.score(states[j]))
            if progress is not None:
                progress.update(len(chunk))
            del chunk
        return out

    # -- Fisher ------------------------------------------------------------------------------

    def fisher(self, names: set[str], folder: Path, progress: bool = False) -> dict[str, str]:
        """The empirical Fisher diagonal of GGUF tensors `names` in per-token units: T x the mean over
        windows of (dL/dw)^2, L the mean NLL of a window's T scored tokens. Float32, in the
        transformers layout. Walks back through the units one at a time: the gradient entering
        each block's output, per window, is kept between blocks; each unit's diagonals go to
        `folder/fisher-<unit>.safetensors` when it is done (so no more than one unit's are held).
        Returns {name: its file}."""
        import torch
        from safetensors.numpy import save
        from tqdm import tqdm

        from ..files import write_bytes

        files: dict[str, str] = {}

        sm = self.model
        n, t = self.ref.windows.shape
        n_tokens = t - 1 - self.ref.score_from
        acc: dict[str, torch.Tensor] = {}
        targets = torch.from_numpy(self.ref.windows[:, self.ref.score_from + 1:])

        # a tied output: token_embd's gradient is the embedding's plus the head's, squared together
        tied_head: dict[int, torch.Tensor] = {}

        def collect(unit: str, w: int) -> None:
            for name, grad in sm.gradients_of(unit).items():
                if name not in names:
                    continue
                g = grad.float().to("cpu")
                if sm.info.tied_output and name == "token_embd.weight":
                    if unit == "head":
                        tied_head[w] = g.clone()
                        continue
                    g = g + tied_head.pop(w)
                acc.setdefault(name, torch.zeros_like(g)).addcmul_(g, g, value=n_tokens / n)

        grads: list[torch.Tensor] = []
        units = ["head", *(f"blk.{i}" for i in reversed(range(self.n_layer))), "embed"]
        with tqdm(total=len(units) * n, desc="fisher", unit="step", disable=not progress, file=sys.stderr) as bar:
            for unit in units:
                with sm.loaded(unit), sm.trainable(unit), torch.enable_grad():
                    for w in range(n):
                        sm.zero_grad(unit)
                        if unit == "head":
                            h = torch.from_numpy(self.ref.inputs[self.n_layer][w:w + 1]).to(sm.device, sm.dtype)
                            h.requires_grad_(True)
                            logits = sm.logits(h[:, self.ref.score_from:-1])[0]
                            tgt = targets[w].to(logits.device)
                            nll = (torch.logsumexp(logits, -1) - logits.gather(1, tgt[:, None])[:, 0]).double().mean()
                            nll.backward()
                            grads.append(h.grad.detach().to("cpu"))
                        elif unit == "embed":
                            e = sm.embed(torch.from_numpy(self.ref.windows[w:w + 1]))
                            e.backward(grads[w].to(e.device, e.dtype))
                        else:
                            i = int(unit.removeprefix("blk."))
                            h = torch.from_numpy(self.ref.inputs[i][w:w + 1]).to(sm.device, sm.dtype)
                            h.requires_grad_(True)
                            out = sm.layer(i, h, self.kwargs(1)[i])
                            out.backward(grads[w].to(out.device, out.dtype))
                            grads[w] = h.grad.detach().to("cpu")
                        collect(unit, w)
                        bar.update(1)
                    sm.zero_grad(unit)
                if acc:
                    path = folder / f"fisher-{unit}.safetensors"
                    write_bytes(path, save({name: a.numpy() for name, a in acc.items()}))
                    files.update(dict.fromkeys(acc, str(path)))
                    acc.clear()
        return files


# --------------------------------------------------------------------------------------------
# in memory


class _Runner:
    """The in-memory incremental runner the activation study uses (its hooks quantize inputs of a
    whole resident model): a transformers decoder-only model, run once in float32 over a batch of windows with the
    hidden state entering each block cached; `score(start)` reruns from block `start` (-1: from
    the embeddings) with whatever weights the model holds now and returns the mean KLD against the
    float32 logits of the scored positions and the mean NLL of their true next tokens (`ref_nll`:
    the float32 model's). What each decoder layer's call needs (masks, rotary embeddings) is the
    architecture's (`Adapter.block_kwargs`)."""

    def __init__(self, model: torch.nn.Module, windows: torch.Tensor, score_from: int,
                 adapter: Adapter | None = None):
        import torch

        from ..arch import for_model

        self.model = model
        self.adapter = adapter or for_model(model)
        inner = model.get_decoder()
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.embed = inner.embed_tokens
        self.head = model.get_output_embeddings()
        self.ids = windows
        b, t = windows.shape
        self.scored = slice(score_from, t - 1)  # position i predicts token i+1; the last one predicts nothing
        self.targets = windows[:, score_from + 1:].reshape(-1)
        with torch.inference_mode():
            emb = self.embed(windows)
            self.pos = torch.arange(t).unsqueeze(0).expand(b, -1)
            self.block_kwargs = self.adapter.block_kwargs(inner, emb, self.pos)
            h = emb
            self.cache = []
            for i in range(len(self.layers)):
                self.cache.append(h)
                h = self._layer(i, h)
            self.cache.append(h)
            self.ref = self._logits(h)  # (n_scored, n_vocab) float32
            self.p = torch.softmax(self.ref.double(), dim=-1).float()
            self.ref_nll = float(self._nll(self.ref))
        self.n_scored = int(self.ref.shape[0])

    def _layer(self, i: int, h):
        out = self.layers[i](h, **self.block_kwargs[i])
        return out[0] if isinstance(out, tuple) else out

    def _logits(self, h):
        h = self.norm(h[:, self.scored])
        return self.head(h).reshape(-1, self.head.weight.shape[0]).float()

    def _nll(self, logits, targets=None) -> Any:
        """Mean cross-entropy of the true next tokens (`targets`, default the scored ones) as a 0-d
        float64 tensor."""
        import torch

        targets = self.targets if targets is None else targets
        nll = torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[:, None])[:, 0]
        return nll.double().mean()

    def score(self, start: int) -> tuple[float, float]:
        """(mean KLD, mean NLL) over the scored tokens. KL(p_ref || p_now) is computed without
        cancellation: with d = ref - now (logits) and c = E_p[d], KL = log1p(E_p[expm1(c - d)])."""
        import torch

        with torch.inference_mode():
            h = self.embed(self.ids) if start < 0 else self.cache[start]
            for i in range(max(start, 0), len(self.layers)):
                h = self._layer(i, h)
            return kld_nll(self._logits(h), self.ref, self.p, self.targets)


# --------------------------------------------------------------------------------------------
# setting up


def _held_out_windows(tokenizer: Any, text: str, ctx: int, n: int) -> torch.Tensor:
    from ..text import adds_bos, token_windows

    windows = token_windows(tokenizer, text, ctx, None, add_bos=adds_bos(tokenizer))
    if windows.shape[0] < n:
        raise MixquantError(f"the calibration text has only {windows.shape[0]} windows of {ctx} tokens; "
                            f"{n} were asked for")
    return windows[-n:].clone()


def measurement_windows(src: Source, text: str | os.PathLike[str] | None,
                        windows: torch.Tensor | np.ndarray | None, n_windows: int, ctx: int,
                        score_from: int | None, settings: dict[str, Any]) -> tuple[np.ndarray, int]:
    """The (n, ctx) token windows the damage is measured on (`windows`, or the last `n_windows`
    windows of `ctx` tokens of `text`) and the first scored position."""
    from transformers import AutoTokenizer

    from ..source import quiet_transformers
    from ..text import read_text

    folder = getattr(src, "hf_folder", None)
    if folder is None:
        raise MixquantError(f"{src.path}: measuring damage needs the model's Hugging Face folder "
                            "(the float32 model runs in transformers); use measure='none' for a GGUF source")
    if windows is None:
        if text is None:
            raise MixquantError("measuring damage needs the calibration text (text=...) or token windows")
        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(Path(folder), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - tokenizer libraries raise anything
            raise MixquantError(f"{folder}: cannot load the tokenizer: {exc}") from None
        windows = _held_out_windows(tokenizer, read_text(Path(text).expanduser()), ctx, n_windows)
        settings["text"] = str(text)
    windows = np.ascontiguousarray(np.asarray(windows, dtype=np.int64))
    if windows.ndim != 2 or windows.shape[1] < 8:
        raise MixquantError(f"windows must be (n, ctx) token ids with ctx >= 8, got shape {tuple(windows.shape)}")
    n, t = windows.shape
    first = t // 8 if score_from is None else int(score_from)
    if not 0 <= first < t - 1:
        raise MixquantError(f"score_from must be in [0, {t - 2}], got {first}")
    settings.update(windows=int(n), ctx=int(t), score_from=first, tokens=int(n * (t - 1 - first)))
    return windows, first


def reference_pass(model: StreamedModel, windows: np.ndarray, score_from: int,
                   progress: bool = False) -> Reference:
    """Run the float model over `windows` block by block, keeping every block's input."""
    import torch
    from tqdm import tqdm

    n, t = windows.shape
    ids = torch.from_numpy(windows)
    inputs = []
    with torch.inference_mode():
        h = model.embed(ids).float().to("cpu")
        dummy = torch.zeros((n, t, 1), dtype=model.dtype, device=model.device)
        kwargs = model.block_kwargs(dummy, torch.arange(t, device=model.device).unsqueeze(0).expand(n, -1))
        for i in tqdm(range(model.n_layer), desc="reference", unit="block", disable=not progress, file=sys.stderr):
            inputs.append(h.numpy())
            with model.loaded(f"blk.{i}"):
                h = model.layer(i, h.to(model.device, model.dtype), kwargs[i]).float().to("cpu")
        inputs.append(h.numpy())
        with model.loaded("head"):
            logits = model.logits(h[:, score_from:-1].to(model.device, model.dtype))
        logits = logits.reshape(-1, logits.shape[-1]).to("cpu")
        targets = torch.from_numpy(np.ascontiguousarray(windows[:, score_from + 1:].reshape(-1)))
        nll = float((torch.logsumexp(logits, -1) - logits.gather(1, targets[:, None])[:, 0]).double().mean())
    return Reference(windows=windows, score_from=score_from, inputs=inputs, logits=logits.numpy(), nll=nll)


__all__ = ["Reference", "Measurer", "measurement_windows", "reference_pass", "unit_of"]
