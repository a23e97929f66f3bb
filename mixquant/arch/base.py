"""The adapter contract: what mixquant needs to know about one model family, and the registry.

An adapter is registered under the Hugging Face class names of config.json's "architectures"
(as convert_hf_to_gguf.py's ModelBase.register and llm-compressor's mapping registries key them)
and the config's model_type; GGUF sources find it by general.architecture. Every stage asks it:

* source/export: `gguf_arch`, `gguf_name` (gguf's TensorNameMap), `to_gguf` (q/k permutation,
  norm shift), `vocab_rows` (the token embedding's rows kept), `required_tensors`, `derived_tensors`
  (rope_freqs), `add_hparams`, `add_vocab`;
* evaluate/analyze: `parameters` (GGUF name -> transformers parameter), `from_gguf` (the inverse
  of `to_gguf`), `derived` (GGUF tensors with no parameter), `block_kwargs` (what one decoder
  layer call needs);
* calibrate: `linear_modules` (nn.Linear -> GGUF weight), `input_groups` (which weights share an
  input), `norm_feeds` (which norm or linear feeds which linears, for smoothing transforms); for
  mixture-of-experts layers `expert_modules`, `routed_tokens` and `expert_hidden` (what each
  expert's matrices multiply: llama-imatrix's per-expert sums).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import gguf
import numpy as np

from ..errors import MixquantError

if TYPE_CHECKING:
    import torch
    from gguf import GGUFWriter

    from ..plan import ModelInfo
    from ..source import HFSource

__all__ = ["Adapter", "Fold", "register", "for_config", "for_gguf_arch", "for_model", "hf_classes", "permute_qk",
           "unpermute_qk", "INPUT_GROUPS", "BLOCK_INPUTS"]

# GGUF weight kind -> the activation it multiplies, shared by the weights that read the same tensor
# (q/k/v one, gate/up another); the keys of calibrate's ActivationStats.
INPUT_GROUPS: dict[str, str] = {
    "attn_q": "attn_in", "attn_k": "attn_in", "attn_v": "attn_in", "attn_qkv": "attn_in",
    "attn_output": "attn_output_in", "ffn_gate": "ffn_in", "ffn_up": "ffn_in", "ffn_down": "ffn_down_in",
    "ffn_gate_inp": "ffn_in", "ffn_gate_exps": "ffn_in", "ffn_up_exps": "ffn_in", "ffn_down_exps": "ffn_down_in",
}
# the order of a block's activation keys (then the residual stream leaving it)
BLOCK_INPUTS = ("attn_in", "attn_output_in", "ffn_in", "ffn_down_in", "residual")

_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(.*)")
_LLAMA_BLOCK = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")


def permute_qk(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: HF's rotate-half rows to ggml's interleaved rope pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return np.ascontiguousarray(
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of `permute_qk` for `heads` heads: ggml's interleaved rope pairs back to Hugging
    Face's rotate-half row order."""
    if w.shape[0] % (2 * heads):
        raise MixquantError(f"cannot un-permute {w.shape[0]} rows for {heads} heads")
    return np.ascontiguousarray(
        w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


@dataclass(frozen=True)
class Fold:
    """One exact per-channel rescaling inside a block (`Adapter.folds`): the feeder's output channels
    divided by s and the targets' input columns multiplied by s[column_channel] compute the same
    function (a norm's weight multiplies its output; a linear feeder's rows, and its bias, make it)."""

    feeder: str  # GGUF tensor: a norm weight (its elements) or a linear weight (its rows) giving the channels
    rows: slice  # the feeder's rows (elements) that are the channels, in order
    bias: str | None  # the feeder's bias, divided along the same rows
    targets: tuple[str, ...]  # the weights reading the channels
    input_key: str  # the targets' input ("blk.3.attn_in"): their Hessian's and statistics' key
    column_channel: np.ndarray | None  # target column -> channel (None: column j reads channel j)

    @property
    def channels(self) -> int:
        return self.rows.stop - self.rows.start


class Adapter:
    """One model family. Subclasses set the class attributes and override what differs; the
    methods are those of a llama-like decoder (llama, mistral, qwen2, qwen3)."""

    hf_classes: ClassVar[tuple[str, ...]] = ()  # config.json "architectures"[0]
    model_types: ClassVar[tuple[str, ...]] = ()  # config.json "model_type", when "architectures" is absent
    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    permutes_qk: ClassVar[bool] = False  # convert_hf_to_gguf permutes q/k rows (llama rope)
    norm_shift: ClassVar[float] = 0.0  # added to every *norm.weight on export (Gemma's 1 + w)
    block_tensors: ClassVar[tuple[str, ...]] = _LLAMA_BLOCK  # required in every block
    derived: ClassVar[frozenset[str]] = frozenset()  # GGUF tensors computed from config.json
    input_groups: ClassVar[dict[str, str]] = INPUT_GROUPS
    # what feeds what inside a block, for smoothing/scaling transforms: scaling the source's output
    # channels by s and the targets' input columns by 1/s leaves the function unchanged
    norm_feeds: ClassVar[dict[str, tuple[str, ...]]] = {
        "attn_norm": ("attn_q", "attn_k", "attn_v"), "ffn_norm": ("ffn_gate", "ffn_up"),
        "attn_v": ("attn_output",), "ffn_up": ("ffn_down",),
    }

    # input key -> the decoder layer's norm module whose output is exactly that input, and whose
    # weight multiplies it (so a per-channel scale folds into the weight: SmoothQuant)
    input_norms: ClassVar[dict[str, str]] = {"attn_in": "input_layernorm", "ffn_in": "post_attention_layernorm"}

    @property
    def name(self) -> str:
        """The GGUF architecture name (general.architecture)."""
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    # -- names --------------------------------------------------------------------------------

    def tensor_map(self, n_layer: int) -> gguf.TensorNameMap:
        return gguf.get_tensor_name_map(self.gguf_arch, n_layer)

    def skips(self, hf_name: str) -> bool:
        """Checkpoint entries that are not weights (buffers saved by old transformers versions)."""
        return hf_name.endswith((".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq"))

    def expert_of(self, hf_name: str) -> tuple[str, int | None]:
        """A per-expert checkpoint tensor ("...mlp.experts.3.up_proj.weight") -> the name of the
        stacked tensor it is a slice of ("...mlp.experts.up_proj.weight") and its expert index;
        other tensors -> (hf_name, None)."""
        m = _EXPERT.fullmatch(hf_name)
        return (f"{m.group(1)}.{m.group(3)}", int(m.group(2))) if m else (hf_name, None)

    def gguf_name(self, hf_name: str, tmap: gguf.TensorNameMap) -> str | None:
        """The GGUF tensor name of a checkpoint tensor or transformers parameter (None: unknown)."""
        return tmap.get_name(hf_name.replace("language_model.", ""), try_suffixes=(".weight", ".bias"))

    def required_tensors(self, info: ModelInfo) -> list[str]:
        """Tensors a checkpoint of this family must have."""
        out = ["token_embd.weight", "output_norm.weight"] + ([] if info.tied_output else ["output.weight"])
        return out + [f"blk.{i}.{p}" for i in range(info.n_layer) for p in self.block_tensors]

    # -- values -------------------------------------------------------------------------------

    def _qk_heads(self, name: str, info: ModelInfo) -> int | None:
        if self.permutes_qk and name.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
            return info.n_head if ".attn_q." in name else info.n_head_kv
        return None

    def _shifted(self, name: str) -> bool:
        return bool(self.norm_shift) and name.endswith("norm.weight")

    def check_shape(self, name: str, shape: tuple[int, ...], info: ModelInfo) -> str | None:
        """Why a checkpoint tensor's shape cannot be converted (None: it can)."""
        heads = self._qk_heads(name, info)
        if heads is not None and shape[0] % (2 * heads):
            return f"tensor {name} has {shape[0]} rows, not divisible by 2 x {heads} heads"
        return None

    def expected_shapes(self, n_embd: int, q_rows: int, kv_rows: int, head_dim: int, n_ff: int | None,
                        n_vocab: int) -> dict[str, tuple[int, ...]]:
        """GGUF shape (rows, cols) of each tensor kind ("attn_q.weight", or a whole name outside the
        blocks) as config.json gives it, to catch a checkpoint that disagrees with its config."""
        e = n_embd
        return {"token_embd.weight": (n_vocab, e), "output.weight": (n_vocab, e), "output_norm.weight": (e,),
                "attn_norm.weight": (e,), "ffn_norm.weight": (e,), "attn_q.weight": (q_rows, e),
                "attn_k.weight": (kv_rows, e), "attn_v.weight": (kv_rows, e), "attn_output.weight": (e, q_rows),
                "ffn_gate.weight": (n_ff, e), "ffn_up.weight": (n_ff, e), "ffn_down.weight": (e, n_ff),
                "attn_q.bias": (q_rows,), "attn_k.bias": (kv_rows,), "attn_v.bias": (kv_rows,),
                "attn_q_norm.weight": (head_dim,), "attn_k_norm.weight": (head_dim,)}

    def to_gguf(self, name: str, x: np.ndarray, info: ModelInfo) -> np.ndarray:
        """A checkpoint tensor (float32, transformers layout) -> the values convert_hf_to_gguf writes."""
        heads = self._qk_heads(name, info)
        if heads is not None:
            x = permute_qk(x, heads)
        if self._shifted(name):
            x = x + np.float32(self.norm_shift)
        return x

    def from_gguf(self, name: str, x: np.ndarray, info: ModelInfo) -> np.ndarray:
        """Inverse of `to_gguf`: GGUF values -> the transformers parameter's layout and values."""
        heads = self._qk_heads(name, info)
        if heads is not None:
            x = unpermute_qk(x, heads)
        if self._shifted(name):
            x = x - np.float32(self.norm_shift)
        return x

    def converts(self, name: str, info: ModelInfo) -> bool:
        """Whether `to_gguf`/`from_gguf` change this tensor (a q/k permutation, a norm shift); when
        not, checkpoint and GGUF rows are the same and can be read or written a slice at a time."""
        return self._qk_heads(name, info) is not None or self._shifted(name)

    def vocab_rows(self, src: HFSource, tokenizer: dict[str, Any]) -> int:
        """The GGUF's vocabulary size: how many rows of the checkpoint's token embedding (and untied
        output) it keeps, the first ones, and how many tokens its token list has (`tokenizer`:
        tokenizer.json). All `vocab_size` rows unless the family's converter drops some."""
        return src.vocab_size

    def delta_to_hf(self, name: str, d: np.ndarray, info: ModelInfo) -> np.ndarray:
        """A difference of two GGUF tensors in the transformers layout (no shift: it cancels)."""
        heads = self._qk_heads(name, info)
        return unpermute_qk(d, heads) if heads is not None else d

    def derived_tensors(self, src: HFSource) -> dict[str, Callable[[], np.ndarray]]:
        """GGUF tensors computed from config.json (name -> loader), e.g. llama3's rope_freqs."""
        return {}

    # -- metadata -----------------------------------------------------------------------------

    def add_hparams(self, w: GGUFWriter, hp: dict[str, Any], src: HFSource) -> None:
        """The family's own hyperparameter keys, after TextModel.set_gguf_parameters' generic ones."""

    def add_vocab(self, w: GGUFWriter, src: HFSource, tokenizer_config: dict[str, Any]) -> None:
        """The tokenizer, as the family's set_vocab writes it (default: GPT-2 BPE)."""
        src._add_vocab_gpt2(w)

    @staticmethod
    def _add_vocab_spm_or_gpt2(w: GGUFWriter, src: HFSource) -> bool:
        """A SentencePiece-style tokenizer.json (byte fallback, "\u2581" spaces) as llama.cpp's
        "llama" vocabulary, as convert_hf_to_gguf writes it from tokenizer.model; else GPT-2 BPE.
        True when it was SentencePiece-style."""
        try:
            src._add_vocab_llama_hf(w)
            return True
        except (FileNotFoundError, TypeError):
            src._add_vocab_gpt2(w)
            return False

    # -- transformers -------------------------------------------------------------------------

    def parameters(self, model: torch.nn.Module, info: ModelInfo) -> dict[str, torch.Tensor]:
        """GGUF tensor name -> the transformers parameter holding it, or the view of one that does
        (a fused parameter split as GGUF splits it); a tied output appears once. Every tensor of
        `info` except `derived` ones must have one."""
        tmap = self.tensor_map(info.n_layer)
        out = {}
        for full_name, param in model.named_parameters():
            for hf_name, p in self.split_parameter(full_name, param):
                name = self.gguf_name(hf_name, tmap)
                if name is None:
                    raise MixquantError(f"cannot map parameter {hf_name!r} to a GGUF tensor name for {self.name}")
                out[name] = p
        expected = {t.name for t in info.tensors} - self.derived
        if set(out) != expected:
            odd = sorted(set(out) ^ expected)
            raise MixquantError(f"transformers' parameters and the checkpoint's tensors differ: {', '.join(odd[:3])}")
        return out

    def split_parameter(self, hf_name: str, p: torch.nn.Parameter) -> list[tuple[str, torch.Tensor]]:
        """A transformers parameter -> (checkpoint-style name, tensor) of each GGUF tensor it holds."""
        return [(hf_name, p)]

    def linear_modules(self, model: torch.nn.Module, n_layer: int) -> dict[str, str]:
        """nn.Linear module name -> the GGUF weight it multiplies by."""
        import torch

        tmap = self.tensor_map(n_layer)
        out = {}
        for module_name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                name = self.gguf_name(module_name + ".weight", tmap)
                if name is not None:
                    out[module_name] = name
        return out

    def expert_modules(self, model: torch.nn.Module, n_layer: int) -> dict[str, int]:
        """Mixture-of-experts layers: the name of the module whose call receives the tokens and the
        experts they are routed to -> its block index (its stacks are blk.N.ffn_{gate,up,down}_exps).
        None in a dense family."""
        return {}

    def routed_tokens(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """A call of an `expert_modules` module -> (its tokens (n, n_embd), the indices (n, n_used)
        of the experts each one is routed to)."""
        raise NotImplementedError(f"{self.name} has no mixture-of-experts layers")

    def expert_hidden(self, module: torch.nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
        """The input of expert `expert`'s down projection for its tokens `x` (n, n_embd)."""
        raise NotImplementedError(f"{self.name} has no mixture-of-experts layers")

    def norms_before(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """Activation key ("blk.3.attn_in") -> the norm module of `input_norms` producing it."""
        out = {}
        for i, layer in enumerate(model.get_decoder().layers):
            for key, attr in self.input_norms.items():
                norm = getattr(layer, attr, None)
                if norm is not None and getattr(norm, "weight", None) is not None:
                    out[f"blk.{i}.{key}"] = norm
        return out

    def input_of(self, tensor_name: str, tied_output: bool = False) -> str | None:
        """The activation key of the input GGUF weight `tensor_name` multiplies ("blk.3.attn_in"
        for q/k/v, ...; "output_in" for the output layer, and the token embedding when tied)."""
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", tensor_name)
        if m:
            kind = self.input_groups.get(m.group(2))
            return f"blk.{m.group(1)}.{kind}" if kind else None
        if tensor_name == "output.weight" or (tied_output and tensor_name == "token_embd.weight"):
            return "output_in"
        return None

    def folds(self, info: ModelInfo) -> list[Fold]:
        """Every `norm_feeds` rescaling of the model, block by block (each block's linear feeders,
        v -> o and up -> down, before its norms), for AWQ-style weight transforms."""
        shapes = {t.name: t.shape for t in info.tensors}
        out = []
        for i in range(info.n_layer):
            block = []
            for kind, target_kinds in self.norm_feeds.items():
                feeder, targets = f"blk.{i}.{kind}.weight", tuple(f"blk.{i}.{k}.weight" for k in target_kinds)
                if feeder not in shapes or not all(t in shapes for t in targets):
                    continue
                cols = {shapes[t][-1] for t in targets}
                if len(cols) != 1 or any(len(shapes[t]) != 2 for t in targets):
                    raise MixquantError(f"{self.name}: {', '.join(targets)} do not read one input of one width")
                rows, column_channel = self.fold_channels(kind, shapes[feeder], cols.pop(), info)
                bias = f"blk.{i}.{kind}.bias"
                block.append(Fold(feeder, rows, bias if len(shapes[feeder]) == 2 and bias in shapes else None, targets,
                                  self.input_of(targets[0]), column_channel))
            out += sorted(block, key=lambda f: len(shapes[f.feeder]) == 1)  # linear feeders first
        return out

    def fold_channels(self, kind: str, feeder_shape: tuple[int, ...], cols: int, info: ModelInfo
                      ) -> tuple[slice, np.ndarray | None]:
        """(the feeder's rows that are the channels, target column -> channel) for a `norm_feeds`
        feeder of this shape whose targets have `cols` columns. A norm or a linear with one row per
        column: all of them, one to one. attn_v under grouped-query attention: its n_head_kv heads'
        rows, each read by the attn_output columns of the n_head / n_head_kv query heads it serves."""
        rows = feeder_shape[0]
        if len(feeder_shape) == 1 or rows == cols:
            if rows != cols:
                raise MixquantError(f"{self.name}: {kind} has {rows} channels but feeds inputs of {cols} columns")
            return slice(0, rows), None
        return slice(0, rows), self._kv_columns(kind, rows, cols, info)

    def _kv_columns(self, kind: str, kv_rows: int, cols: int, info: ModelInfo) -> np.ndarray:
        """attn_output column -> value channel under grouped-query attention (query head h reads kv
        head h // (n_head / n_head_kv))."""
        if info.n_head_kv <= 0 or cols % info.n_head or info.n_head % info.n_head_kv \
                or kv_rows != info.n_head_kv * (cols // info.n_head):
            raise MixquantError(f"{self.name}: cannot map {kind}'s {kv_rows} rows onto {cols} attention columns "
                                f"({info.n_head} heads, {info.n_head_kv} kv heads)")
        head_dim = cols // info.n_head
        col = np.arange(cols)
        return (col // head_dim) // (info.n_head // info.n_head_kv) * head_dim + col % head_dim

    def block_kwargs(self, decoder: torch.nn.Module, embeds: torch.Tensor,
                     position_ids: torch.Tensor) -> list[dict[str, Any]]:
        """The keyword arguments of each decoder layer's call (`decoder.layers[i](h, **kw[i])`):
        the attention mask of its layer type (full or sliding window) and the rotary embedding."""
        rope = decoder.rotary_emb(embeds, position_ids=position_ids)
        masks = self._masks(decoder.config, embeds, position_ids, len(decoder.layers))
        return [{"attention_mask": m, "position_embeddings": rope, "position_ids": position_ids, "use_cache": False}
                for m in masks]

    @staticmethod
    def _masks(config: Any, embeds: torch.Tensor, position_ids: torch.Tensor, n_layer: int) -> list[Any]:
        from transformers.masking_utils import (
            create_causal_mask,
            create_sliding_window_causal_mask,
        )

        kinds = getattr(config, "layer_types", None) or ["full_attention"] * n_layer
        makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        made = {}
        for kind in set(kinds):
            if kind not in makers:
                raise MixquantError(f"layer type {kind!r} is not supported")
            made[kind] = makers[kind](config=config, inputs_embeds=embeds, attention_mask=None,
                                      past_key_values=None, position_ids=position_ids)
        return [made[k] for k in kinds]


_BY_HF_CLASS: dict[str, Adapter] = {}
_BY_MODEL_TYPE: dict[str, Adapter] = {}
_BY_GGUF_ARCH: dict[str, Adapter] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: register an adapter under its HF class names, model types and GGUF arch."""
    adapter = cls()
    for name in cls.hf_classes:
        _BY_HF_CLASS[name] = adapter
    for name in cls.model_types:
        _BY_MODEL_TYPE[name] = adapter
    _BY_GGUF_ARCH.setdefault(adapter.name, adapter)
    return cls


def hf_classes() -> list[str]:
    """Every supported Hugging Face class name."""
    return list(_BY_HF_CLASS)


def for_config(config: dict[str, Any], where: str | Path = "config.json") -> Adapter:
    """The adapter of a config.json (its "architectures"[0], else its "model_type")."""
    archs = config.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise MixquantError(f"{where}: malformed config.json: \"architectures\" must be a list of names")
    if archs:
        if archs[0] in _BY_HF_CLASS:
            return _BY_HF_CLASS[archs[0]]
        name = archs[0]
    else:
        model_type = config.get("model_type")
        if model_type in _BY_MODEL_TYPE:
            return _BY_MODEL_TYPE[model_type]
        if model_type is None:
            raise MixquantError(f"{where}: malformed config.json: neither \"architectures\" nor \"model_type\" is set")
        name = f"model_type {model_type}"
    raise MixquantError(f"{where}: unsupported architecture {name!r}; supported: {', '.join(_BY_HF_CLASS)}")


def for_gguf_arch(arch: str, where: str | Path = "") -> Adapter:
    """The adapter of a GGUF general.architecture."""
    try:
        return _BY_GGUF_ARCH[arch]
    except KeyError:
        prefix = f"{where}: " if where else ""
        raise MixquantError(f"{prefix}unsupported architecture {arch!r}; supported: {', '.join(_BY_GGUF_ARCH)}") \
            from None


def for_model(model: torch.nn.Module) -> Adapter:
    """The adapter of a loaded transformers model (by its class name)."""
    name = type(model).__name__
    if name in _BY_HF_CLASS:
        return _BY_HF_CLASS[name]
    return for_config(model.config.to_dict(), name)
