"""The measurement: the float32 model run once with every block's input cached (`_Runner`), and
one tensor (or one block) swapped for its quantized values and rerun from its block (`_Measurer`)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import MixquantError
from ..plan import layer_of

if TYPE_CHECKING:
    import torch

    from ..arch import Adapter
    from ..plan import ModelInfo
    from ..source import Source

# --------------------------------------------------------------------------------------------
# measured damage: the incremental runner


class _Runner:
    """A transformers decoder-only model, run once in float32 over a batch of windows with the
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
            d = self._logits(h)
            nll = float(self._nll(d))
            d.neg_().add_(self.ref)  # d = ref - now
            c = torch.einsum("nv,nv->n", self.p, d)
            d.neg_().add_(c[:, None]).expm1_()  # expm1(c - d)
            e = torch.einsum("nv,nv->n", self.p, d)
            kl = torch.log1p(e.double())
        return float(kl.clamp_min(0).mean()), nll

    def fisher(self, params: dict[str, Any], progress: bool = False) -> dict[str, np.ndarray]:
        """The empirical Fisher diagonal of `params` ({name: parameter}) in per-token units:
        T x the mean over windows of (dL/dw)^2, L the mean NLL of a window's T scored tokens (see
        the module docstring). Float32, in the parameters' (transformers) layout."""
        import torch
        from tqdm import tqdm

        if not params:
            return {}
        wanted = {id(p) for p in params.values()}
        for p in self.model.parameters():  # no gradients, and no memory for them, elsewhere
            p.requires_grad_(id(p) in wanted)
        acc = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
        n, t = self.ids.shape
        n_tokens = t - 1 - self.scored.start
        try:
            for i in tqdm(range(n), desc="fisher", unit="window", disable=not progress, file=sys.stderr):
                self.model.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    logits = self.model(input_ids=self.ids[i:i + 1], use_cache=False).logits[0, self.scored]
                    self._nll(logits, self.ids[i, self.scored.start + 1:]).backward()
                for name, p in params.items():
                    acc[name].addcmul_(p.grad, p.grad, value=n_tokens / n)
        finally:
            self.model.zero_grad(set_to_none=True)
            for p in self.model.parameters():
                p.requires_grad_(False)
        return {name: a.numpy() for name, a in acc.items()}


@dataclass
class _Measurer:
    runner: _Runner
    params: dict[str, torch.nn.Parameter]  # GGUF name -> the transformers parameter
    info: ModelInfo
    adapter: Adapter

    def to_hf(self, name: str, x: np.ndarray) -> np.ndarray:
        """GGUF values -> the transformers parameter's layout and values."""
        return self.adapter.from_gguf(name, x, self.info)

    def delta_to_hf(self, name: str, d: np.ndarray) -> np.ndarray:
        """A difference of GGUF values (w - q) in the transformers parameter's layout."""
        return self.adapter.delta_to_hf(name, d, self.info)

    def start_of(self, name: str) -> int:
        """The block a rerun starts from: the tensor's block; -1 (embeddings) for token_embd;
        past the last block for the output layer."""
        il = layer_of(name)
        if il is not None:
            return il
        if name.startswith("token_embd"):
            return -1
        if name.startswith("output"):
            return len(self.runner.layers)
        raise MixquantError(f"cannot tell where tensor {name} enters the model")

    def measure(self, swaps: dict[str, np.ndarray]) -> tuple[float, float]:
        """(KLD, NLL) with the weights `swaps` ({name: values in GGUF orientation}) in place of
        the float32 ones, rerunning from the first block any of them enters; then put back."""
        import torch

        saved = {}
        try:
            with torch.no_grad():
                for name, q in swaps.items():
                    p = self.params[name]
                    saved[name] = p.data.clone()
                    p.data.copy_(torch.from_numpy(np.ascontiguousarray(self.to_hf(name, q), dtype=np.float32))
                                 .reshape(p.shape))
            return self.runner.score(min(self.start_of(n) for n in swaps))
        finally:
            with torch.no_grad():
                for name, x in saved.items():
                    self.params[name].data.copy_(x)



def _held_out_windows(tokenizer: Any, text: str, ctx: int, n: int) -> torch.Tensor:
    from ..text import adds_bos, token_windows

    windows = token_windows(tokenizer, text, ctx, None, add_bos=adds_bos(tokenizer))
    if windows.shape[0] < n:
        raise MixquantError(f"the calibration text has only {windows.shape[0]} windows of {ctx} tokens; "
                            f"{n} were asked for")
    return windows[-n:].clone()


def setup_measurer(src: Source, text: str | os.PathLike[str] | None, windows: torch.Tensor | np.ndarray | None,
                   n_windows: int, ctx: int,
                   score_from: int | None, settings: dict[str, Any]) -> _Measurer:
    """Load the float32 model of `src`'s Hugging Face folder and run the reference pass over
    `windows` (or the last `n_windows` windows of `ctx` tokens of `text`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..source import quiet_transformers
    from ..text import read_text

    folder = getattr(src, "hf_folder", None)
    if folder is None:
        raise MixquantError(f"{src.path}: measuring damage needs the model's Hugging Face folder "
                            "(the float32 model runs in transformers); use measure='none' for a GGUF source")
    folder = Path(folder)
    if windows is None:
        if text is None:
            raise MixquantError("measuring damage needs the calibration text (text=...) or token windows")
        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - tokenizer libraries raise anything
            raise MixquantError(f"{folder}: cannot load the tokenizer: {exc}") from None
        windows = _held_out_windows(tokenizer, read_text(Path(text).expanduser()), ctx, n_windows)
        settings["text"] = str(text)
    windows = torch.as_tensor(windows, dtype=torch.long)
    if windows.ndim != 2 or windows.shape[1] < 8:
        raise MixquantError(f"windows must be (n, ctx) token ids with ctx >= 8, got shape {tuple(windows.shape)}")
    n, t = windows.shape
    first = t // 8 if score_from is None else int(score_from)
    if not 0 <= first < t - 1:
        raise MixquantError(f"score_from must be in [0, {t - 2}], got {first}")
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True,
                                                         use_safetensors=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise MixquantError(f"{folder}: transformers cannot load the model: {exc}") from None
    model.eval()
    runner = _Runner(model, windows, first, src.adapter)
    settings.update(windows=int(n), ctx=int(t), score_from=first, tokens=runner.n_scored)
    return _Measurer(runner=runner, params=src.adapter.parameters(model, src.model), info=src.model,
                     adapter=src.adapter)

