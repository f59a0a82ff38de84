"""Speculative decoding with transformers' generation settings: top-k, repetition penalty, stop
strings, end-of-sequence ids, a ``GenerationConfig`` and streamers; each equals plain decoding
with the same settings, also when a step accepts several tokens at once. The CLI streams it."""

import io
import json
from contextlib import redirect_stdout

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, TextIteratorStreamer, TextStreamer

from conftest import TinyTokenizer, random_ids, tiny_llama
from test_integration import byte_tokenizer
from tokensift import cli
from tokensift.generate import generate
from tokensift.models import load_model
from tokensift.speculative import Speculator

VARIANTS = [("auto", None), ("recycling", 8), ("lookahead", 12), ("prompt_lookup", 4)]


def peaked_model():
    """A tiny random Llama with sharp next-token distributions: it repeats itself, so drafts are
    accepted (several tokens per step) and sampling is close to greedy."""
    model = tiny_llama(seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)
    return model


def repetitive_prompt(length: int = 60) -> list[int]:
    base = random_ids(12, seed=4)[0].tolist()
    return (base * (length // len(base) + 1))[:length]


def plain(model, ids, **options) -> list[int]:
    return generate(model, TinyTokenizer(), ids, stop_at_eos=False, **options).token_ids[0]


def speculative(model, drafter, nodes, ids, **options):
    return Speculator(model, drafter, fixed_nodes=nodes).generate(TinyTokenizer(), ids, stop_at_eos=False, **options)


@pytest.mark.parametrize("drafter, nodes", VARIANTS)
def test_repetition_penalty_equals_plain_and_transformers(drafter, nodes):
    model, ids = peaked_model(), repetitive_prompt()
    reference = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, repetition_penalty=1.3,
                               pad_token_id=0)[0, len(ids):].tolist()
    result = speculative(model, drafter, nodes, ids, max_new_tokens=24, repetition_penalty=1.3)
    assert result.token_ids == plain(model, ids, max_new_tokens=24, repetition_penalty=1.3) == reference
    assert result.token_ids != plain(model, ids, max_new_tokens=24)  # the penalty changed the output


@pytest.mark.parametrize("drafter, nodes", VARIANTS)
def test_top_k_sampling_equals_plain_with_the_same_seed(drafter, nodes):
    """One sample per emitted token from the same generator: the same seed gives the same tokens."""
    model, ids = peaked_model(), repetitive_prompt()
    for seed in range(3):
        options = dict(max_new_tokens=20, temperature=1.5, top_k=4, top_p=0.95, repetition_penalty=1.1, seed=seed)
        assert speculative(model, drafter, nodes, ids, **options).token_ids == plain(model, ids, **options)
    top1 = speculative(model, drafter, nodes, ids, max_new_tokens=20, temperature=2.0, top_k=1).token_ids
    assert top1 == plain(model, ids, max_new_tokens=20)


def test_stop_string_inside_a_multi_token_step():
    """The stop string completes in the middle of a step's accepted tokens: output ends after that token."""
    model, ids, tokenizer = peaked_model(), repetitive_prompt(), TinyTokenizer()
    speculator = Speculator(model, "auto", fixed_nodes=12)
    emitted = []  # tokens each verification yields (accepted drafts + 1)
    verify = speculator.verify
    speculator.verify = lambda *args: (lambda out: (emitted.append(len(out[0])), out)[1])(verify(*args))
    free = speculator.generate(tokenizer, ids, max_new_tokens=30, stop_at_eos=False)
    assert free.steps < free.new_tokens  # some steps accepted several tokens
    cut_mid_step = 0
    for cut in range(2, 30):
        stop = tokenizer.decode(free.token_ids[cut - 2:cut])  # two tokens: the stop needs the second one
        n = next(i for i in range(1, 31) if stop in tokenizer.decode(free.token_ids[:i]))
        emitted.clear()
        result = speculator.generate(tokenizer, ids, max_new_tokens=30, stop_at_eos=False, stop_strings=[stop])
        assert result.token_ids == free.token_ids[:n] == plain(model, ids, max_new_tokens=30, stop_strings=[stop])
        cut_mid_step += sum(emitted) > n  # the last step had accepted tokens past the stop
    assert cut_mid_step


def test_generation_config_and_eos_ids():
    model, ids = peaked_model(), repetitive_prompt()
    free = plain(model, ids, max_new_tokens=20)
    eos = free[7]
    config = GenerationConfig(max_new_tokens=20, repetition_penalty=1.2, eos_token_id=eos)
    spec = Speculator(model, "auto", fixed_nodes=10).generate(TinyTokenizer(), ids, generation_config=config)
    expected = generate(model, TinyTokenizer(), ids, generation_config=config).token_ids[0]
    assert spec.token_ids == expected and (eos not in expected or expected[-1] == eos)
    sampled = GenerationConfig(max_new_tokens=16, do_sample=True, top_k=5, temperature=1.2)
    spec = Speculator(model, "auto", fixed_nodes=10).generate(TinyTokenizer(), ids, generation_config=sampled, seed=5)
    assert spec.token_ids == generate(model, TinyTokenizer(), ids, generation_config=sampled, seed=5).token_ids[0]


CYCLE = "é日🙂жa"  # 12 distinct bytes: characters of 2, 3, 4 and 1 bytes
PROMPT = CYCLE * 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_generation_settings_on_cuda():
    """The same settings on CUDA (fp32): speculation equals plain decoding there too."""
    model, ids = peaked_model().to("cuda"), repetitive_prompt()
    for options in (dict(repetition_penalty=1.3), dict(temperature=1.5, top_k=4, seed=2)):
        spec = speculative(model, "auto", 10, ids, max_new_tokens=20, **options)
        assert spec.token_ids == plain(model, ids, max_new_tokens=20, **options)
    free = plain(model, ids, max_new_tokens=20)
    stop = TinyTokenizer().decode(free[8:10])
    assert speculative(model, "auto", 10, ids, max_new_tokens=20, stop_strings=[stop]).token_ids == \
        plain(model, ids, max_new_tokens=20, stop_strings=[stop])


@pytest.fixture(scope="module")
def cycle_folder(tmp_path_factory) -> str:
    """A tiny Llama over byte tokens built as a bigram machine that continues ``CYCLE`` byte by byte
    (one-hot embeddings, silent layers, the output layer maps each byte to the next): its text
    is valid UTF-8 whose characters span tokens, and drafts from the prompt get accepted."""
    tokenizer = byte_tokenizer()
    cycle = tokenizer(CYCLE)["input_ids"]
    assert len(cycle) == len(set(cycle)) == len(CYCLE.encode())
    config = LlamaConfig(vocab_size=260, hidden_size=264, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(260, 264))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.zeros(260, 264)
        for token in range(260):
            following = cycle[(cycle.index(token) + 1) % len(cycle)] if token in cycle else cycle[0]
            head[following, token] = 1.0
        model.lm_head.weight.copy_(head)
    folder = tmp_path_factory.mktemp("tiny-byte-cycle")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_streamers_get_the_speculative_text(cycle_folder):
    model, tokenizer = load_model(cycle_folder)
    speculator = Speculator(model, "auto", fixed_nodes=12)
    iterator = TextIteratorStreamer(tokenizer, skip_prompt=True)
    result = speculator.generate(tokenizer, PROMPT, max_new_tokens=40, streamer=iterator, stop_at_eos=False)
    assert "".join(iterator) == result.text and result.steps < result.new_tokens
    printed = io.StringIO()
    with redirect_stdout(printed):
        speculator.generate(tokenizer, PROMPT, max_new_tokens=40, streamer=TextStreamer(tokenizer, skip_prompt=True),
                            stop_at_eos=False)
    assert printed.getvalue() == result.text + "\n"


def run_cli(monkeypatch, capsys, args) -> str:
    monkeypatch.setattr("sys.argv", ["tokensift", "generate", *args])
    cli.main()
    return capsys.readouterr().out


def test_cli_speculate_streams_whole_characters(monkeypatch, capsys, cycle_folder):
    """``generate --speculate auto`` prints exactly the text of the run, character by character, though
    steps accept several byte tokens at once and characters span tokens."""
    args = ["--model", cycle_folder, "--prompt", PROMPT, "--max-new-tokens", "36", "--speculate", "auto",
            "--no-spec-warm", "--tree-nodes", "12", "--repetition-penalty", "1.1", "--top-k", "3"]
    streamed = run_cli(monkeypatch, capsys, args)
    result = json.loads(run_cli(monkeypatch, capsys, [*args, "--json"]))
    assert streamed == result["text"] + "\n" and "\ufffd" not in streamed
    assert result["steps"] < result["new_tokens"]
    model, tokenizer = load_model(cycle_folder)
    expected = generate(model, tokenizer, PROMPT, max_new_tokens=36, repetition_penalty=1.1, top_k=3)
    assert result["token_ids"] == expected.token_ids[0] and result["text"] == CYCLE * 3
    stop = expected.text[0][3:5]
    stopped = json.loads(run_cli(monkeypatch, capsys, [*args, "--json", "--stop", stop]))
    assert stopped["token_ids"] == generate(model, tokenizer, PROMPT, max_new_tokens=36, repetition_penalty=1.1,
                                            stop_strings=[stop]).token_ids[0]
