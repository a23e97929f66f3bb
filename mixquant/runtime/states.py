"""Hidden states between blocks: in RAM within their share of the memory budget, in a temporary
file (memory-mapped) beyond it."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


class HiddenStates:
    """A float32 (n_windows, n_tokens, n_embd) array of one point of the forward pass, read and
    written a chunk of windows at a time. In memory when it fits `allowance` bytes, else spilled to
    a temporary file (deleted on `close`) whose pages the kernel writes back as it needs."""

    def __init__(self, shape: tuple[int, int, int], allowance: int | None = None, folder: str | Path | None = None):
        self.shape = tuple(int(s) for s in shape)
        self.nbytes = 4 * int(np.prod(self.shape))
        self.spilled = allowance is not None and self.nbytes > allowance
        self._file = None
        if self.spilled:
            self._file = tempfile.NamedTemporaryFile(prefix="mixquant-states-", suffix=".f32", dir=folder)
            self._data = np.memmap(self._file.name, dtype=np.float32, mode="w+", shape=self.shape)
        else:
            self._data = np.empty(self.shape, dtype=np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def get(self, rows: slice) -> torch.Tensor:
        """Windows `rows` as a float32 CPU tensor (a copy when spilled)."""
        import torch

        x = self._data[rows]
        return torch.from_numpy(np.array(x) if self.spilled else x)

    def set(self, rows: slice, x: torch.Tensor) -> None:
        self._data[rows] = x.detach().to("cpu", dtype=x.new_empty(0).float().dtype).numpy()

    def close(self) -> None:
        if self._file is not None:
            del self._data
            self._file.close()
            self._file = None

    def __del__(self) -> None:
        self.close()
