"""Where mixquant keeps what it builds once: the test model, the text, the reference ggml."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$MIXQUANT_CACHE`, else `~/.cache/mixquant`; created on first use."""
    path = Path(os.environ.get("MIXQUANT_CACHE") or Path.home() / ".cache" / "mixquant")
    path.mkdir(parents=True, exist_ok=True)
    return path
