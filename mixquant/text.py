"""Text to token windows, exactly as llama.cpp's llama-imatrix and llama-perplexity cut it.

Source of truth: llama.cpp 0c1e570, `tools/imatrix/imatrix.cpp` (`compute_imatrix`),
`tools/perplexity/perplexity.cpp` (`perplexity`), `common/arg.cpp` (`-f`) and `common/common.cpp`
(`common_tokenize`). Both tools:

1. read the `-f` file byte for byte and drop one trailing newline (`read_text` here);
2. tokenize the whole text once with `add_special=true, parse_special=false`: a BOS in front when
   the vocabulary adds one (`tokenizer.ggml.add_bos_token`), no EOS (both tools assert the vocab
   adds none), and special (control) tokens written in the text are tokenized as plain text;
3. refuse a text shorter than `2 * n_ctx` tokens;
4. cut `n_chunk = min(--chunks, n_tokens // n_ctx)` consecutive, non-overlapping windows of `n_ctx`
   tokens from the start (the remainder is dropped) and, when the vocab adds BOS, overwrite the
   first token of *every* window with BOS (so one text token is lost at each window boundary;
   window 0 already starts with the BOS that tokenization added).

Positions restart at 0 in every window and the KV cache is cleared between windows, so each
window is an independent sequence of length `n_ctx`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import MixquantError

if TYPE_CHECKING:
    import torch

__all__ = ["read_text", "read_json", "write_json", "adds_bos", "tokenize", "token_windows"]


def read_bytes(path: str | Path) -> bytes:
    """A whole input file; an unreadable one is a one-line MixquantError naming it."""
    from .files import note_input

    note_input(path)
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise MixquantError(f"{path}: cannot read: {exc.strerror or exc}") from None


def read_json(path: str | os.PathLike[str]) -> Any:
    """A JSON file (the analysis files); unreadable or not JSON is a one-line MixquantError."""
    path = Path(path).expanduser()
    raw = read_bytes(path)
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise MixquantError(f"{path}: not JSON: {exc}") from None
    except RecursionError:
        raise MixquantError(f"{path}: not usable JSON: nested too deeply") from None


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write `data` as JSON atomically (mixquant.files: never half a file, never over an input)."""
    from .files import write_text

    return write_text(path, json.dumps(data, indent=1, allow_nan=False) + "\n")


def read_text(path: str | Path) -> str:
    """A text file as llama.cpp's `-f` reads it: bytes as they are (no newline translation), one
    trailing "\\n" removed."""
    path = Path(path)
    raw = read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MixquantError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if text.endswith("\n"):
        text = text[:-1]
    return text


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a text when special tokens are added.

    This is what convert_hf_to_gguf.py records as `tokenizer.ggml.add_bos_token` for the usual
    tokenizers (llama-3 style post-processors add it, SmolLM/GPT-2 style ones do not). When you
    evaluate a GGUF file whose metadata says otherwise, pass `add_bos` explicitly.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(without) and with_special[0] == bos and without[:1] != [bos]


def tokenize(tokenizer, text: str, add_bos: bool | None = None) -> list[int]:
    """`common_tokenize(ctx, text, add_special=true, parse_special=false)`: BOS (if the vocab adds
    it) followed by the text's tokens, special tokens in the text split as ordinary text."""
    if add_bos is None:
        add_bos = adds_bos(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The fast path: the Rust tokenizer directly (no max-length warnings, no Python overhead).
        # encode_special_tokens=True is parse_special=false: control tokens in the text are not
        # recognised, user-defined added tokens still are (llama.cpp does the same).
        previous = backend.encode_special_tokens
        backend.encode_special_tokens = True
        try:
            ids = backend.encode(text, add_special_tokens=False).ids
        finally:
            backend.encode_special_tokens = previous
    else:
        ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
    ids = list(ids)
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise MixquantError("the tokenizer has no BOS token but add_bos was requested")
        ids.insert(0, int(tokenizer.bos_token_id))
    return ids


def token_windows(tokenizer, text: str, ctx: int, max_chunks: int | None = None, *,
                  add_bos: bool | None = None) -> torch.LongTensor:
    """The `(n_chunks, ctx)` token windows llama-imatrix / llama-perplexity evaluate for `text`
    with `-c ctx --chunks max_chunks` (None or a negative number: all of them).

    `add_bos` defaults to what the tokenizer does (`adds_bos`); llama.cpp takes it from the GGUF
    vocab. Raises MixquantError when the text has fewer than `2 * ctx` tokens, as both tools do.
    """
    if ctx <= 0:
        raise MixquantError(f"context size must be positive, got {ctx}")
    if add_bos is None:
        add_bos = adds_bos(tokenizer)
    tokens = tokenize(tokenizer, text, add_bos=add_bos)
    if len(tokens) < 2 * ctx:
        raise MixquantError(
            f"the text tokenizes to only {len(tokens)} tokens; a context of {ctx} needs at least {2 * ctx}"
        )
    n_chunk_max = len(tokens) // ctx
    n_chunk = n_chunk_max if max_chunks is None or max_chunks < 0 else min(max_chunks, n_chunk_max)
    import torch  # here, so that reading files does not load torch

    windows = torch.tensor(tokens[: n_chunk * ctx], dtype=torch.long).reshape(n_chunk, ctx)
    if add_bos:
        windows[:, 0] = int(tokenizer.bos_token_id)
    return windows
