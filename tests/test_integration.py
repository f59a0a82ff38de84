"""Using tokensift like transformers: devices and dtypes, apply(), the pipeline, GenerationConfig,
streamers, CLI streaming, the examples. Checks marked ``gpu`` rerun on CUDA when there is one.
"""

import io
import runpy
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from transformers import (
    GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TextIteratorStreamer, TextStreamer,
    pipeline,
)

import tokensift
from conftest import random_ids, tiny_llama, tiny_qwen2
from tokensift import cli
from tokensift.attention import NAME
from tokensift.devices import clock, resolve_device, resolve_dtype
from tokensift.engine import make_cache
from tokensift.errors import TokensiftError
from tokensift.generate import generate
from tokensift.hooks import HOOK_FLAG
from tokensift.integration import TASK
from tokensift.models import load_model
from tokensift.policies import build_policy
from tokensift.speculative import Speculator
from tokensift.streaming import IncrementalText

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])]
MULTIBYTE = "héllo wörld, 日本語 🙂 ok"


def small_policy(name, budget=24):
    return build_policy(name, budget=budget, n_sink=2, window=4)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + <eos>): multi-byte characters span tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = 256
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    """A tiny random Llama with a byte-level tokenizer, saved as a model folder (loads like any model)."""
    folder = tmp_path_factory.mktemp("tiny-byte-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    LlamaForCausalLM(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


def on(model, device, dtype=torch.float32):
    return model.to(device=device, dtype=dtype)


# ------------------------------------------------------------------ devices and dtypes
def test_names_resolve_and_bad_ones_are_one_line_errors():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype(None) is torch.float32
    assert resolve_dtype(torch.float16) is torch.float16
    assert resolve_device(None) == torch.device("cpu") and resolve_device("auto").type in ("cpu", "cuda")
    for bad_dtype in ("float7", "int8", torch.int8):
        with pytest.raises(TokensiftError, match="dtype"):
            resolve_dtype(bad_dtype)
    for bad_device in ("tpu9", "cuda:99", "nonsense:x"):
        with pytest.raises(TokensiftError, match="device"):
            resolve_device(bad_device)
    assert clock("cpu") <= clock(torch.device("cpu"))


def test_load_model_places_weights_and_dtype(tiny_folder):
    model, tokenizer = load_model(tiny_folder, device="cpu", dtype="bfloat16")
    assert next(model.parameters()).dtype is torch.bfloat16 and model.device.type == "cpu"
    assert model.config._attn_implementation == NAME
    result = generate(model, tokenizer, "some text", max_new_tokens=3, stop_at_eos=False)
    assert result.new_tokens == 3


@pytest.mark.parametrize("args, fragment", [(["--device", "tpu9"], "unknown device"), (["--dtype", "int3"], "unknown dtype")])
def test_cli_bad_device_or_dtype_is_one_line(monkeypatch, capsys, args, fragment):
    monkeypatch.setattr("sys.argv", ["tokensift", "generate", "--prompt", "hi", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and fragment in err and len(err.strip().splitlines()) == 1


def probe_policy(name):
    """``name`` with small settings, or None when it does not build that way."""
    from tokensift.policies import POLICIES

    cls = POLICIES[name]
    try:
        if name in ("full", "zipcache"):
            return build_policy(name)
        if getattr(cls, "reads_subset", False):
            return build_policy(name, k=24, n_sink=2, window=4)
        return small_policy(name)
    except TokensiftError:
        return None


def test_nothing_is_created_off_the_model_device(tmp_path, monkeypatch):
    """Any tensor made without ``device=`` lands on the default device, here ``meta`` (no data):
    mixing it with the model's CPU tensors fails, so every policy's batched, sampled, penalized
    run with a question (and the speculator) proves it places what it creates."""
    from tokensift.policies import POLICIES

    monkeypatch.setenv("TOKENSIFT_CACHE", str(tmp_path))
    model, tokenizer = tiny_llama(), tokensift_tokenizer()
    ids = random_ids(60)[0].tolist()
    policies = [p for p in map(probe_policy, sorted(POLICIES)) if p is not None]
    with torch.device("meta"):
        for policy in policies + [build_policy("adakv(snapkv)", budget=24, n_sink=2, window=4)]:
            result = generate(model, tokenizer, [ids, ids[:40]], question=[[5, 6], [7, 8]], policy=policy,
                              max_new_tokens=4, temperature=0.8, top_k=10, repetition_penalty=1.2)
            assert result.new_tokens == 4, policy.name
        spec = Speculator(model, "auto", fixed_nodes=6).generate(tokenizer, ids, max_new_tokens=8, temperature=0.8,
                                                                  policy=small_policy("snapkv", budget=40))
        assert spec.new_tokens == 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float32, marks=[pytest.mark.gpu, CUDA])])
@pytest.mark.parametrize("device", DEVICES)
def test_full_equals_plain_generate(device, dtype):
    if device == "cpu" and dtype is torch.float32:
        pytest.skip("the fp32 CPU case is test_engine's")
    model = on(tiny_llama(), device, dtype)
    ids = random_ids(50).to(device)
    reference = model.generate(ids, max_new_tokens=20, do_sample=False)
    ours = model.generate(ids, max_new_tokens=20, do_sample=False, past_key_values=make_cache(model, build_policy("full")))
    assert torch.equal(reference, ours)
    loop = generate(model, tokensift_tokenizer(), ids[0].tolist(), max_new_tokens=20)
    assert loop.token_ids[0] == reference[0, 50:].tolist()


def tokensift_tokenizer():
    from conftest import TinyTokenizer

    return TinyTokenizer()


@pytest.mark.parametrize("name", ["full", "snapkv", "h2o"])
@pytest.mark.parametrize("device", DEVICES)
def test_batch_equals_one_by_one_in_bf16(device, name):
    model = on(tiny_llama(), device, torch.bfloat16)
    tokenizer = tokensift_tokenizer()
    prompts = [random_ids(n, seed=n)[0].tolist() for n in (70, 45, 58)]
    batched = generate(model, tokenizer, prompts, policy=small_policy(name) if name != "full" else None, max_new_tokens=10)
    for prompt, tokens in zip(prompts, batched.token_ids):
        alone = generate(model, tokenizer, prompt, policy=small_policy(name) if name != "full" else None, max_new_tokens=10)
        assert alone.token_ids[0] == tokens


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("name", ["snapkv", "a2sf", "fasa", "sepllm", "zipcache", "topk_attention", "tokenselect"])
def test_policies_run_on_cuda(name, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENSIFT_CACHE", str(tmp_path))
    model = on(tiny_llama(), "cuda")
    policy = build_policy(name) if name == "zipcache" else (
        build_policy(name, k=24, n_sink=2, window=4) if name in ("topk_attention", "tokenselect") else small_policy(name))
    result = generate(model, tokensift_tokenizer(), random_ids(60)[0].tolist(), question=[5, 6, 7], policy=policy,
                      max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.2)
    assert result.new_tokens == 8


@pytest.mark.parametrize("device", DEVICES)
def test_speculative_greedy_identical_on_device(device):
    model = on(tiny_llama(), device)
    ids = (random_ids(12, seed=4)[0].tolist() * 4)[:45]
    plain = generate(model, tokensift_tokenizer(), ids, max_new_tokens=20)
    spec = Speculator(model, "auto", fixed_nodes=6).generate(tokensift_tokenizer(), ids, max_new_tokens=20)
    assert spec.token_ids == plain.token_ids[0]


# ------------------------------------------------------------------ apply() and the pipeline
@pytest.mark.parametrize("device", DEVICES)
def test_apply_restores_attention_and_removes_the_hook(device):
    model = on(tiny_qwen2(), device)
    model.set_attn_implementation("sdpa")
    ids = random_ids(60).to(device)
    with tokensift.apply(model, "streaming_llm", budget=40) as cache:
        assert model.config._attn_implementation == NAME and getattr(model, HOOK_FLAG, None) is not None
        model.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False)
        assert cache.kv_tokens() == 40
    assert model.config._attn_implementation == "sdpa"
    assert getattr(model, HOOK_FLAG, None) is None and not model._forward_pre_hooks


def test_apply_leaves_what_was_there_before():
    model = tiny_llama()
    make_cache(model, build_policy("full"))  # tokensift attention and the hook, for good
    with tokensift.apply(model, "full"):
        pass
    assert model.config._attn_implementation == NAME and getattr(model, HOOK_FLAG, None) is not None


def test_apply_parameters_need_a_policy_name():
    model = tiny_llama()
    with pytest.raises(TokensiftError, match="policy name"), tokensift.apply(model, budget=64):
        pass
    assert model.config._attn_implementation == "sdpa"


def test_apply_restores_even_after_an_error():
    model = tiny_llama()
    model.set_attn_implementation("eager")
    with pytest.raises(RuntimeError), tokensift.apply(model, "full"):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "eager" and not model._forward_pre_hooks


def test_pipeline_asks_the_question_after_compression(tiny_folder):
    model, tokenizer = load_model(tiny_folder)
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer, policy="snapkv", budget=48, max_new_tokens=6)
    context = "a long context about nothing much " * 4
    output = pipe(context=context, question=" and a question?")
    expected = generate(model, tokenizer, context, question=" and a question?", policy=build_policy("snapkv", budget=48),
                        max_new_tokens=6)
    assert output[0]["generated_text"] == expected.text[0]
    assert output[0]["kv_bytes"] == expected.kv_bytes < expected.kv_bytes_full
    assert isinstance(pipe, tokensift.TokensiftPipeline)


# ------------------------------------------------------------------ GenerationConfig and streamers
def test_generation_config_greedy_and_top_k_one():
    model, tokenizer = tiny_llama(), tokensift_tokenizer()
    ids = random_ids(40, seed=2)[0].tolist()
    greedy = generate(model, tokenizer, ids, max_new_tokens=12)
    assert generate(model, tokenizer, ids, generation_config=GenerationConfig(max_new_tokens=12)).token_ids == greedy.token_ids
    top1 = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.3, top_k=1)
    assert generate(model, tokenizer, ids, generation_config=top1).token_ids == greedy.token_ids
    sampled = GenerationConfig(max_new_tokens=12, do_sample=True, top_k=5, top_p=0.9)
    first = generate(model, tokenizer, ids, generation_config=sampled, seed=3)
    assert generate(model, tokenizer, ids, generation_config=sampled, seed=3).token_ids == first.token_ids


@pytest.mark.parametrize("device", DEVICES)
def test_repetition_penalty_matches_transformers(device):
    model = on(tiny_llama(), device)
    ids = random_ids(30, seed=6).to(device)
    reference = model.generate(ids, max_new_tokens=15, do_sample=False, repetition_penalty=1.5)[0, 30:].tolist()
    config = GenerationConfig(max_new_tokens=15, repetition_penalty=1.5)
    ours = generate(model, tokensift_tokenizer(), ids[0].tolist(), generation_config=config)
    assert ours.token_ids[0] == reference
    assert ours.token_ids[0] != generate(model, tokensift_tokenizer(), ids[0].tolist(), max_new_tokens=15).token_ids[0]


def test_stop_strings_end_after_the_completing_token():
    model, tokenizer = tiny_llama(), tokensift_tokenizer()
    ids = random_ids(40, seed=1)[0].tolist()
    free = generate(model, tokenizer, ids, max_new_tokens=12).token_ids[0]
    stop = f" {free[5]}"
    n = next(i for i in range(1, 13) if stop in tokenizer.decode(free[:i]))
    stopped = generate(model, tokenizer, ids, generation_config=GenerationConfig(max_new_tokens=12, stop_strings=stop))
    assert stopped.token_ids[0] == free[:n]
    assert generate(model, tokenizer, ids, max_new_tokens=12, stop_strings=[stop]).token_ids[0] == free[:n]


def test_streamers_receive_the_generated_text(tiny_folder):
    model, tokenizer = load_model(tiny_folder)
    iterator = TextIteratorStreamer(tokenizer, skip_prompt=True)
    result = generate(model, tokenizer, "stream this", max_new_tokens=10, streamer=iterator)
    assert "".join(iterator) == result.text[0]
    printed = io.StringIO()
    with redirect_stdout(printed):
        generate(model, tokenizer, "stream this", max_new_tokens=10, streamer=TextStreamer(tokenizer, skip_prompt=True))
    assert printed.getvalue() == result.text[0] + "\n"
    with pytest.raises(TokensiftError, match="one prompt"):
        generate(model, tokenizer, ["a", "b"], max_new_tokens=2, streamer=TextStreamer(tokenizer))


def test_incremental_text_never_splits_a_character():
    tokenizer = byte_tokenizer()
    ids = tokenizer(MULTIBYTE)["input_ids"]
    assert len(ids) > len(MULTIBYTE)  # some characters do span several tokens
    text = IncrementalText(tokenizer)
    pieces = [text.push(token) for token in ids] + [text.flush()]
    assert "".join(pieces) == MULTIBYTE and not any("\ufffd" in piece for piece in pieces)


def test_cli_prints_multibyte_text_whole(capsys):
    on_token, finish = cli.text_printer(byte_tokenizer())
    for token in byte_tokenizer()(MULTIBYTE)["input_ids"]:
        on_token(token)
    finish()
    assert capsys.readouterr().out == MULTIBYTE + "\n"


def test_cli_generate_on_a_model_folder_in_bf16(monkeypatch, capsys, tiny_folder):
    monkeypatch.setattr("sys.argv", ["tokensift", "generate", "--model", tiny_folder, "--prompt", "héllo",
                                     "--device", "cpu", "--dtype", "bf16", "--max-new-tokens", "5", "--json"])
    cli.main()
    assert '"new_tokens": 5' in capsys.readouterr().out


# ------------------------------------------------------------------ examples
@pytest.mark.parametrize("script, args", [
    ("compress_then_ask.py", ["--sentences", "12", "--budget", "64", "--max-new-tokens", "4"]),
    ("apply_with_generate.py", ["--budget", "48", "--max-new-tokens", "4"]),
    ("pipeline_stream.py", ["--budget", "48", "--max-new-tokens", "4"]),
])
def test_examples_run(tiny_folder, script, args, capsys):
    main = runpy.run_path(str(EXAMPLES / script))["main"]
    output = main(["--model", tiny_folder, *args])
    assert output and capsys.readouterr().out
    if script == "apply_with_generate.py":
        assert output["attention"] == "sdpa" and output["kept"] == 48


@pytest.mark.real
@pytest.mark.parametrize("script", ["compress_then_ask.py", "apply_with_generate.py", "pipeline_stream.py"])
def test_examples_on_the_embedded_model(script, capsys):
    main = runpy.run_path(str(EXAMPLES / script))["main"]
    output = main(["--max-new-tokens", "8"] + (["--sentences", "60"] if script == "compress_then_ask.py" else []))
    assert output and capsys.readouterr().out


def test_cli_sampling_options_reach_generate(monkeypatch, capsys, tiny_folder):
    args = ["--model", tiny_folder, "--prompt", "abc", "--max-new-tokens", "6", "--json"]
    monkeypatch.setattr("sys.argv", ["tokensift", "generate", *args, "--repetition-penalty", "1.4", "--top-k", "1",
                                     "--temperature", "0.9"])
    cli.main()
    penalized = capsys.readouterr().out
    model, tokenizer = load_model(tiny_folder)
    expected = generate(model, tokenizer, "abc", max_new_tokens=6, repetition_penalty=1.4)
    assert f'"token_ids": {expected.token_ids[0]}' in penalized
    monkeypatch.setattr("sys.argv", ["tokensift", "generate", *args, "--speculate", "auto", "--no-spec-warm",
                                     "--repetition-penalty", "1.4"])  # (the warm start has its own tests)
    cli.main()  # the speculative path takes the same options (tests/test_spec_generation.py)
    assert f'"token_ids": {expected.token_ids[0]}' in capsys.readouterr().out


def test_vision_selectors_create_nothing_off_the_model_device():
    """The meta probe above, for every visual-token selector inside a tiny DINOv2."""
    import transformers as tf

    from tokensift.vision.selectors import selector_names
    from tokensift.vision.vit import run_vit

    torch.manual_seed(0)
    model = tf.Dinov2Model(tf.Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2,
                                           image_size=56, patch_size=14)).eval()
    px = torch.randn(2, 3, 56, 56)
    with torch.device("meta"):
        for name in selector_names():
            assert run_vit(model, px, name, budget=5, layer=1).last_hidden_state.shape[1] == 6, name


def test_vision_cli_bad_device_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("sys.argv", ["tokensift", "vision", "--image", str(tmp_path / "x.png"), "--device", "tpu9"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unknown device" in err and len(err.strip().splitlines()) == 1
