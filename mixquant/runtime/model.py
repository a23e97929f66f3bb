"""A transformers causal LM whose weights stay in their files until a forward pass needs them.

The model's skeleton is built on the meta device (no weight memory); its computed buffers (rotary
frequencies, Gemma's embedding scale) are made for real. The weights are read per unit (the token
embedding, one decoder block, the final norm and output head) from the `Source` (safetensors shards
or a GGUF, both memory-mapped with pages released after each read), through the architecture
adapter's conversion back to transformers' layout, upcast to the compute dtype, and dropped back to
meta when the unit is done, unless the whole model fits the memory budget, in which case every unit
stays resident after its first load. Another weight provider (`weights`: GGUF name -> values in
GGUF orientation, e.g. a quantized file's dequantized tensors) runs a quantized model the same way.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Union

import numpy as np

from ..errors import MixquantError
from .memory import budget_from, format_size, trim_heap

if TYPE_CHECKING:
    import torch

    from ..source import Source

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda", "mps", "auto")
# the forward pass's own working memory on top of the weights, as a multiple of one unit's bytes
# (activations of a chunk of windows, attention scores, the upcast copy of a bf16 tensor)
_WORKING_FACTOR = 1.0
# a 2-D tensor above this many float32 bytes (a large vocabulary's embedding or output) is read and
# written a slice of rows at a time, so no whole temporary copy of it is made
SLICED_BYTES = 64 << 20
_SLICE_BYTES = 16 << 20


@dataclass
class RowSlices:
    """The values of a 2-D tensor (GGUF orientation) made `step` rows at a time by `rows(start,
    stop)`: how a tensor too large to copy whole is loaded, swapped in and put back."""

    shape: tuple[int, int]
    step: int
    rows: Callable[[int, int], np.ndarray]


Values = Union[np.ndarray, RowSlices]  # a tensor's values, GGUF orientation


def slice_rows(cols: int, multiple: int = 1) -> int:
    """Rows per slice of a tensor with `cols` columns: about 16 MB of float32, a multiple of `multiple`."""
    return multiple * max(1, _SLICE_BYTES // (4 * cols * multiple))


def resolve_device(name: str | None = "cpu") -> torch.device:
    """--device: cpu, cuda, mps or auto (the first accelerator torch finds, else the CPU)."""
    import torch

    name = (name or "cpu").lower()
    if name not in DEVICES and not name.startswith("cuda:"):
        raise MixquantError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MixquantError("--device cuda: torch sees no CUDA device (this torch build: "
                            f"{torch.__version__}); use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise MixquantError("--device mps: torch sees no Apple GPU; use --device cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str | None) -> torch.dtype:
    import torch

    name = name or "float32"
    if name not in DTYPES:
        raise MixquantError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


class StreamedModel:
    """`src`'s model, run one unit at a time.

    device / dtype: where and in which precision the forward passes run (float32 is the reference);
    max_memory: the budget in bytes (or a size string; None: what the machine has free now): the
    weights stay resident when the whole model fits half of it, else each unit is loaded for its
    pass and released; a budget that one unit does not fit is refused, naming the minimum.
    weights: GGUF name -> float32 values in GGUF orientation (default: the source's own tensors).
    """

    def __init__(self, src: Source, *, device: str | torch.device | None = "cpu", dtype: str | None = "float32",
                 max_memory: int | str | None = None, weights: Callable[[str], np.ndarray] | None = None):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from ..source import quiet_transformers

        folder = getattr(src, "hf_folder", None)
        if folder is None:
            raise MixquantError(f"{src.path}: running the model needs its Hugging Face folder (config.json and "
                                "tokenizer); a GGUF alone is not enough")
        self.source = src
        self.adapter = src.adapter
        self.info = src.model
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.weights = weights or src.tensor
        try:
            with quiet_transformers():
                config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
                # the GGUF's vocabulary, as llama.cpp runs it: Gemma 3's drops embedding rows
                # beyond the tokenizer's (the logits then have as many columns as llama.cpp's)
                config.vocab_size = src.shape("token_embd.weight")[0]
                with torch.device("meta"):
                    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - transformers raises anything on a bad config
            raise MixquantError(f"{folder}: transformers cannot build the model: {exc}") from None
        self._make_buffers(model)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.decoder = model.get_decoder()
        self.layers = list(self.decoder.layers)
        self.n_layer = len(self.layers)
        self.head = model.get_output_embeddings()
        self._tmap = self.adapter.tensor_map(self.info.n_layer)
        self._loaded: set[str] = set()  # names of the units holding real weights
        self._held: dict[str, int] = {}  # unit -> open `loaded` blocks
        self._views: dict[str, dict[str, Any]] = {}  # unit -> tensors_of(unit), while loaded

        self.unit_bytes = {unit: self._unit_bytes(unit) for unit in self.units}
        self.budget = budget_from(max_memory)
        need = self.min_budget
        if self.budget < need:
            biggest = max(self.unit_bytes, key=self.unit_bytes.get)
            raise MixquantError(f"--max-memory {format_size(self.budget)} is smaller than one unit of this model "
                                f"needs ({biggest}: {format_size(self.unit_bytes[biggest])} of weights in "
                                f"{str(self.dtype).removeprefix('torch.')} plus its working memory); the minimum is "
                                f"{format_size(need)}")
        self.resident = sum(self.unit_bytes.values()) <= self.budget // 2

    # -- units --------------------------------------------------------------------------------

    @property
    def units(self) -> list[str]:
        """"embed", "blk.0" .. "blk.N-1", "head" (the final norm and the output projection)."""
        return ["embed", *(f"blk.{i}" for i in range(self.n_layer)), "head"]

    def modules_of(self, unit: str) -> list[torch.nn.Module]:
        if unit == "embed":
            return [self.decoder.embed_tokens]
        if unit == "head":
            return [self.decoder.norm, self.head]
        return [self.layers[int(unit.removeprefix("blk."))]]

    def _unit_bytes(self, unit: str) -> int:
        size = self.dtype.itemsize if hasattr(self.dtype, "itemsize") else 4
        seen = set()
        n = 0
        for module in self.modules_of(unit):
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
        return n * size

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weights in the compute dtype (a tied output counted once per unit using it)."""
        return sum(self.unit_bytes.values())

    def activation_bytes(self, n_tokens: int) -> int:
        """A decoder block's working memory for one sequence of `n_tokens` (an upper estimate, float32):
        every linear layer's output of the widest block, a few copies of the residual stream, and the
        attention scores and probabilities (n_head x n_tokens^2 each)."""
        widths = max(sum(t.shape[-2] for t in self.info.tensors if t.name.startswith(f"blk.{i}.") and len(t.shape) >= 2)
                     for i in range(self.n_layer))
        return 4 * n_tokens * (widths + 6 * self.info.n_embd + 2 * self.info.n_head * n_tokens)

    def windows_per_pass(self, n_tokens: int, allowance: int) -> int:
        """How many sequences of `n_tokens` one block call can run within `allowance` bytes of working
        memory (at least 1): the block's activations plus the sequence's hidden states read and written."""
        per_window = self.activation_bytes(n_tokens) + 2 * 4 * n_tokens * self.info.n_embd
        return max(1, allowance // per_window)

    @property
    def min_budget(self) -> int:
        """The smallest budget a pass can keep to: the largest unit and its working memory."""
        return int(max(self.unit_bytes.values()) * (1 + _WORKING_FACTOR))

    # -- loading ------------------------------------------------------------------------------

    @staticmethod
    def _make_buffers(model: torch.nn.Module) -> None:
        """Computed buffers (rotary inverse frequencies, embedding scales) are not in the checkpoint:
        build them for real on the CPU with transformers' own initialisation of their modules."""
        import torch

        owners = {}
        for key, buf in model.named_non_persistent_buffers():
            module_name, _, attr = key.rpartition(".")
            module = model.get_submodule(module_name)
            module._buffers[attr] = torch.empty_like(buf, device="cpu")
            owners[module_name] = module
        for module in owners.values():
            model._init_weights(module)

    def _gguf_name(self, hf_name: str) -> str:
        name = self.adapter.gguf_name(hf_name, self._tmap)
        if name == "output.weight" and self.info.tied_output:
            return "token_embd.weight"
        if name is None:
            raise MixquantError(f"cannot map parameter {hf_name!r} to a GGUF tensor name for {self.adapter.name}")
        return name

    def _fill(self, module: torch.nn.Module, prefix: str) -> None:
        import torch

        # normal tensors even when loaded inside inference_mode: a resident unit may later need gradients
        with torch.inference_mode(False), torch.no_grad():
            self._fill_params(module, prefix)

    def _fill_params(self, module: torch.nn.Module, prefix: str) -> None:
        import torch

        for pname, p in list(module.named_parameters(recurse=True)):
            owner_name, _, attr = pname.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            data = torch.empty(p.shape, dtype=torch.float32)
            for hf_name, view in self.adapter.split_parameter(f"{prefix}{pname}", data):
                name = self._gguf_name(hf_name)
                self._write(view, name, self._provided(name, tuple(view.shape)))
            owner._parameters[attr] = torch.nn.Parameter(data.to(self.device, self.dtype), requires_grad=False)

    def _provided(self, name: str, shape: tuple[int, ...]) -> Values:
        """The provider's values of GGUF tensor `name`: in slices of rows when it is a large 2-D
        tensor read straight from the source (checkpoint and GGUF rows the same)."""
        rows = shape[0] if len(shape) == 2 else 0
        if self.weights == self.source.tensor and rows and 4 * rows * shape[1] > SLICED_BYTES \
                and not self.adapter.converts(name, self.info):
            return RowSlices(shape=(rows, shape[1]), step=slice_rows(shape[1]),
                             rows=lambda start, stop: self.source.tensor_rows(name, start, stop))
        return self.weights(name)

    def _write(self, view: torch.Tensor, name: str, values: Values) -> None:
        """GGUF tensor `name`'s values into `view` (its parameter, or its part of a fused one),
        converted to the transformers layout and the view's dtype."""
        import torch

        if isinstance(values, RowSlices):
            if self.adapter.converts(name, self.info) or tuple(values.shape) != tuple(view.shape):
                raise MixquantError(f"tensor {name}: row slices of shape {values.shape} do not fit the model's "
                                    f"{tuple(view.shape)}")
            for start in range(0, values.shape[0], values.step):
                stop = min(start + values.step, values.shape[0])
                view[start:stop].copy_(torch.from_numpy(np.ascontiguousarray(values.rows(start, stop),
                                                                             dtype=np.float32)))
            return
        x = self.adapter.from_gguf(name, np.asarray(values, dtype=np.float32), self.info)
        if tuple(x.shape) != tuple(view.shape):
            raise MixquantError(f"tensor {name}: shape {tuple(x.shape)} does not fit the model's {tuple(view.shape)}")
        view.copy_(torch.from_numpy(np.ascontiguousarray(x)))

    def _prefix(self, module: torch.nn.Module) -> str:
        for name, m in self.model.named_modules():
            if m is module:
                return f"{name}." if name else ""
        raise MixquantError("module is not part of the model")

    def load(self, unit: str) -> None:
        """Give `unit`'s modules their real weights (a no-op when they have them)."""
        if unit in self._loaded:
            return
        for module in self.modules_of(unit):
            self._fill(module, self._prefix(module))
        self._loaded.add(unit)

    def release(self, unit: str, force: bool = False) -> None:
        """Drop `unit`'s weights back to the meta device (kept when the model is resident or a
        `loaded` block still holds them)."""
        import torch

        if unit not in self._loaded or (not force and (self.resident or self._held.get(unit))):
            return
        for module in self.modules_of(unit):
            for pname, p in list(module.named_parameters(recurse=True)):
                owner_name, _, attr = pname.rpartition(".")
                owner = module.get_submodule(owner_name) if owner_name else module
                owner._parameters[attr] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        self._loaded.discard(unit)
        self._views.pop(unit, None)
        trim_heap()  # the freed weights back to the system, or RSS creeps up block by block

    def release_all(self) -> None:
        for unit in list(self._loaded):
            self.release(unit, force=True)

    @contextmanager
    def loaded(self, unit: str) -> Iterator[list[torch.nn.Module]]:
        """`unit`'s modules with their weights, released afterwards unless resident (nests: the
        outermost one releases)."""
        self.load(unit)
        self._held[unit] = self._held.get(unit, 0) + 1
        try:
            yield self.modules_of(unit)
        finally:
            self._held[unit] -= 1
            if not self._held[unit]:
                del self._held[unit]
                self.release(unit)

    def _by_name(self, named: Iterable[tuple[str, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
        """(transformers parameter name, tensor) -> {GGUF name: the tensor, or its view of a fused one};
        a tied output appears once, as token_embd.weight."""
        out: dict[str, torch.Tensor] = {}
        for full_name, x in named:
            if x is None:
                continue
            for hf_name, view in self.adapter.split_parameter(full_name, x):
                out.setdefault(self._gguf_name(hf_name), view)
        return out

    def _named(self, unit: str, of_grad: bool = False) -> dict[str, torch.Tensor]:
        return self._by_name((f"{self._prefix(module)}{pname}", p.grad if of_grad else p.data)
                             for module in self.modules_of(unit) for pname, p in module.named_parameters(recurse=True))

    def parameters_by_name(self) -> dict[str, torch.Tensor]:
        """GGUF tensor name -> the skeleton's parameter (or the view of a fused one) holding it now:
        real where its unit is loaded, on the meta device otherwise."""
        return self._by_name(self.model.named_parameters())

    def linear_weights(self) -> dict[torch.nn.Linear, str]:
        """Every nn.Linear of the skeleton -> the GGUF weight it multiplies its input by (a tied
        output's: token_embd.weight). Modules keep their identity while weights come and go."""
        import torch

        out = {}
        for module_name, name in self.adapter.linear_modules(self.model, self.info.n_layer).items():
            module = self.model.get_submodule(module_name)
            if isinstance(module, torch.nn.Linear):
                out[module] = "token_embd.weight" if name == "output.weight" and self.info.tied_output else name
        return out

    def tensors_of(self, unit: str) -> dict[str, torch.Tensor]:
        """GGUF name -> the loaded unit's tensor (or view of a fused one) holding it, in the
        transformers layout (a tied output's head holds token_embd.weight too)."""
        if unit not in self._loaded:
            raise MixquantError(f"{unit} is not loaded")
        if unit not in self._views:
            self._views[unit] = self._named(unit)
        return self._views[unit]

    def assign(self, unit: str, values: dict[str, Values]) -> None:
        """Put these values (GGUF name -> values in GGUF orientation, e.g. a candidate's quantized
        weights) in place of the loaded unit's tensors of those names; `restore` undoes it."""
        import torch

        views = self.tensors_of(unit)
        with torch.no_grad():
            for name, x in values.items():
                self._write(views[name], name, x)

    def restore(self, unit: str, names: Iterable[str]) -> None:
        """The provider's values back into these tensors of the loaded unit (after `assign`), read
        again rather than kept: no second copy of a swapped tensor is held meanwhile."""
        import torch

        views = self.tensors_of(unit)
        with torch.no_grad():
            for name in names:
                self._write(views[name], name, self._provided(name, tuple(views[name].shape)))

    def gradients_of(self, unit: str) -> dict[str, torch.Tensor]:
        """GGUF name -> the gradient of the loaded unit's tensor (after a backward pass)."""
        return self._named(unit, of_grad=True)

    @contextmanager
    def trainable(self, unit: str) -> Iterator[None]:
        """The loaded unit's parameters require gradients while inside."""
        params = [p for m in self.modules_of(unit) for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None

    def zero_grad(self, unit: str) -> None:
        for m in self.modules_of(unit):
            for p in m.parameters():
                p.grad = None

    def set_weights(self, weights: Callable[[str], np.ndarray] | None) -> None:
        """Another weight provider (None: the source's own); loaded units are dropped."""
        self.release_all()
        self.weights = weights or self.source.tensor

    def reload(self, names: list[str]) -> None:
        """The provider's values for these GGUF tensors changed: drop the units holding them."""
        from ..plan import layer_of

        for name in names:
            il = layer_of(name)
            if il is not None:
                self.release(f"blk.{il}", force=True)
            elif name.startswith("token_embd"):
                self.release("embed", force=True)
                self.release("head", force=True)  # a tied output reads it too
            else:
                self.release("head", force=True)

    # -- the forward pass, unit by unit --------------------------------------------------------

    def block_kwargs(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> list[dict[str, Any]]:
        """Each decoder layer's keyword arguments for hidden states shaped like `embeds`."""
        return self.adapter.block_kwargs(self.decoder, embeds, position_ids)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        with self.loaded("embed") as (embed,):
            return embed(ids.to(self.device))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection of hidden states `h` (the head must be loaded), float32."""
        norm, head = self.modules_of("head")
        return head(norm(h)).float()

    def layer(self, i: int, h: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """Decoder layer `i` (loaded) on `h`."""
        out = self.layers[i](h, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def close(self) -> None:
        self.release_all()

    def __enter__(self) -> StreamedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
