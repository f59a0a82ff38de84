"""Shared fixtures: tiny random Llama, Qwen2 and Gemma 3 models built from configs (fast, offline).

Hypothesis profiles (property tests): ``ci`` (the default, small and deterministic) and
``long`` (``TOKENSIFT_FUZZ=long pytest tests/test_properties.py ...``: many more examples).
"""

import os

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
)

torch.set_num_threads(1)

try:
    from hypothesis import HealthCheck, settings

    _QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    # derandomized: CI explores the same examples every run (a failure is reproducible, never flaky)
    settings.register_profile("ci", deadline=None, derandomize=True, database=None, suppress_health_check=_QUIET,
                              print_blob=True)
    settings.register_profile("long", deadline=None, derandomize=False, database=None, suppress_health_check=_QUIET,
                              print_blob=True)
    settings.load_profile(os.environ.get("TOKENSIFT_FUZZ", "ci"))
except ImportError:  # hypothesis is a test extra (requirements-test.txt); property tests skip without it
    pass


class TinyTokenizer:
    """Just enough of a tokenizer for tokensift.generate on token-id prompts."""

    pad_token_id = 0
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(t) for t in text.split()]}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=1024,
    )
    return Qwen2ForCausalLM(config).eval()


def tiny_gemma3(seed: int = 0) -> Gemma3ForCausalLM:
    """Gemma 3 shape: full-attention layers (selecting) between sliding-window layers (kept as is)."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, sliding_window=16,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
    )
    return Gemma3ForCausalLM(config).eval()


TINY_MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gemma3": tiny_gemma3}


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model(request):
    return tiny_llama() if request.param == "llama" else tiny_qwen2()


@pytest.fixture
def tokenizer():
    return TinyTokenizer()


def random_ids(length: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 128, (batch, length), generator=generator)


def run_bench_cli(monkeypatch, *args) -> int:
    """``tokensift bench *args`` in this process; its exit code (0 when it returns)."""
    import sys

    from tokensift import cli

    monkeypatch.setattr(sys, "argv", ["tokensift", "bench", *args])
    try:
        cli.main()
    except SystemExit as done:
        return done.code
    return 0
