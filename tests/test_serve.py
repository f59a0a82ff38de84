"""tokensift serve on a tiny random model: the official openai client against a real server."""

import concurrent.futures
import time

import pytest

for _module in ("fastapi", "uvicorn", "sse_starlette", "httpx", "openai"):
    pytest.importorskip(_module)  # the serve extra (requirements-serve.txt)

import httpx  # noqa: E402
import openai  # noqa: E402
import torch

from conftest import TinyTokenizer, tiny_llama
from serve_helpers import RunningServer
from tokensift.engine import make_cache
from tokensift.generate import Decoder, generate
from tokensift.policies import build_policy
from tokensift.serve.app import create_app
from tokensift.serve.batch import mergeable, padding_mask, repack, row_lengths
from tokensift.serve.protocol import ServerDefaults
from tokensift.serve.text import TextStream

PROMPTS = [" ".join(str(t) for t in torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist())
           for n in (40, 17, 90, 25)]
SMALL = {"window": 8, "n_sink": 2}


class ChatTokenizer(TinyTokenizer):
    """TinyTokenizer with a chat template: each message's ids between 1 and 2."""

    chat_template = "tiny"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return " ".join(f"1 {m['content']} 2" for m in messages) + (" 1" if add_generation_prompt else "")


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama()
    model.generation_config.eos_token_id = None  # random weights: let every request run to max_tokens
    return model, ChatTokenizer()


@pytest.fixture(scope="module")
def server(tiny):
    model, tokenizer = tiny
    app = create_app(model, tokenizer, "tiny", ServerDefaults(max_tokens=8), max_batch=4, max_queue=16, packed=False)
    with RunningServer(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=60)


def reference(tiny, prompt, policy="full", max_tokens=8, **params):
    model, tokenizer = tiny
    return generate(model, tokenizer, prompt, policy=build_policy(policy, **params), max_new_tokens=max_tokens).text[0]


def test_completion_matches_generate(tiny, client):
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert out.choices[0].text == reference(tiny, PROMPTS[0])
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == 40 and out.usage.completion_tokens == 8
    assert out.tokensift["policy"] == "full" and out.tokensift["kv_bytes"] > 0


def test_stream_matches_plain(tiny, client):
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reference(tiny, PROMPTS[1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8


def test_chat_and_chat_stream(client):
    messages = [{"role": "user", "content": "5 6 7 8"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.usage.prompt_tokens == 7
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content


def test_policy_per_request(tiny, client):
    out = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=8, temperature=0,
                                    extra_body={"policy": "h2o", "budget": 24, "policy_params": SMALL})
    info = out.tokensift
    assert info["policy"] == "h2o" and info["params"]["budget"] == 24
    assert info["kv_bytes"] < info["kv_bytes_full"]
    assert out.choices[0].text == reference(tiny, PROMPTS[2], "h2o", budget=24, **SMALL)


def test_concurrent_requests_share_a_batch_without_leaks(tiny, client):
    """Four greedy requests at once (two policies): each gets exactly what it gets alone."""
    jobs = [(PROMPTS[0], {}), (PROMPTS[1], {"policy": "knorm", "budget": 20, "policy_params": SMALL}),
            (PROMPTS[2], {}), (PROMPTS[3], {"policy": "snapkv", "budget": 20, "policy_params": SMALL})]

    def call(job):
        prompt, extra = job
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body=extra)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(call, jobs))
    for (prompt, extra), out in zip(jobs, outs):
        params = {"budget": extra["budget"], **extra["policy_params"]} if extra else {}
        assert out.choices[0].text == reference(tiny, prompt, extra.get("policy", "full"), 12, **params)
    assert any(o.tokensift["batched"] for o in outs)


def test_repack_joins_and_leaves_like_a_padded_batch(tiny):
    """Rows joining mid-decode and leaving early decode exactly as they do alone."""
    model, tokenizer = tiny
    policy = build_policy("h2o", budget=24, **SMALL)
    prompts = [[int(t) for t in p.split()] for p in PROMPTS[:3]]
    want = [reference(tiny, p, "h2o", 10, budget=24, **SMALL) for p in PROMPTS[:3]]

    def prefill(ids):
        cache = make_cache(model, build_policy("h2o", budget=24, **SMALL))
        logits = Decoder(model, cache).forward(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        return cache, int(logits.argmax(-1))

    cache, first = prefill(prompts[0])
    assert mergeable(cache)
    outs, active = {0: [first]}, [0]
    for step in range(40):
        if step in (2, 5):
            new = 1 if step == 2 else 2
            extra, token = prefill(prompts[new])
            cache = repack(model, policy, [(cache, r) for r in range(len(active))] + [(extra, 0)])
            outs[new], active = [token], active + [new]
        live = [i for i in active if len(outs[i]) < 10]
        if not live:
            break
        if live != active:
            cache, active = repack(model, policy, [(cache, active.index(i)) for i in live]), live
        mask = torch.cat([padding_mask(row_lengths(cache)), torch.ones(len(active), 1, dtype=torch.long)], 1)
        out = model(input_ids=torch.tensor([[outs[i][-1]] for i in active]), attention_mask=mask,
                    position_ids=(mask.cumsum(1) - 1)[:, -1:], past_key_values=cache, use_cache=True)
        for row, i in enumerate(active):
            outs[i].append(int(out.logits[row, -1].argmax()))
    assert [tokenizer.decode(outs[i]) for i in range(3)] == want


def test_sampling_seed_n_and_stop(client):
    ask = dict(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    a, b = client.completions.create(**ask, n=2), client.completions.create(**ask, n=2)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 2
    assert a.usage.completion_tokens == 16
    text = a.choices[0].text
    stop = " " + text.split()[2]
    stopped = client.completions.create(**{**ask, "n": 1}, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[:text.find(stop)]


def test_speculation_is_lossless(tiny, client):
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                    extra_body={"speculate": "prompt_lookup", "tree_nodes": 3})
    assert out.choices[0].text == reference(tiny, PROMPTS[0])
    assert out.tokensift["speculate"] == "prompt_lookup" and "accepted_per_step" in out.tokensift


@pytest.mark.parametrize("body, words", [
    ({"prompt": "5 6", "policy": "nope"}, "unknown policy"),
    ({"prompt": "5 6", "policy": "h2o", "budget": -4}, "budget"),
    ({"prompt": " ".join(["5"] * 1030)}, "exceeds the model's context"),
    ({"prompt": "5 6", "n": 0}, "n must be"),
    ({"prompt": "5 6", "speculate": "magic"}, "unknown drafter"),
    ({"prompt": "5 6", "temperature": -1}, "temperature"),
    ({"prompt": "5 900"}, "token ids"),
    ({"max_tokens": 3}, "prompt"),
])
def test_bad_requests_are_one_line_4xx(server, body, words):
    reply = httpx.post(server + "/v1/completions", json={"model": "tiny", "max_tokens": 4, **body}, timeout=30)
    assert reply.status_code == 400
    message = reply.json()["error"]["message"]
    assert words in message and "\n" not in message
    assert httpx.post(server + "/v1/completions", json={"prompt": "5 6", "max_tokens": 2}, timeout=30).status_code == 200


def test_malformed_json_and_openai_client_errors(server, client):
    reply = httpx.post(server + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["message"] == "request body is not valid JSON"
    with pytest.raises(openai.BadRequestError, match="unknown policy"):
        client.completions.create(model="tiny", prompt="5 6", max_tokens=2, extra_body={"policy": "nope"})
    assert client.completions.create(model="tiny", prompt="5 6", max_tokens=2).choices[0].text


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert httpx.get(server + "/health").json()["status"] == "ok"
    page = httpx.get(server + "/metrics").text
    for name in ("tokensift_requests_total", "tokensift_tokens_per_second", "tokensift_queue_depth", "tokensift_kv_bytes_held"):
        assert name in page


def test_disconnect_frees_the_slot(server, client):
    with httpx.stream("POST", server + "/v1/completions", timeout=30,
                      json={"prompt": PROMPTS[0], "max_tokens": 900, "stream": True}) as reply:
        for line in reply.iter_lines():
            if line.startswith("data:"):
                break
    deadline = time.monotonic() + 20
    while httpx.get(server + "/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(server + "/health").json()["running"] == 0
    assert client.completions.create(model="tiny", prompt="5 6", max_tokens=2).choices[0].text


def test_queue_bound_answers_429(tiny):
    model, tokenizer = tiny
    app = create_app(model, tokenizer, "tiny", ServerDefaults(), max_batch=1, max_queue=1, packed=False)
    with RunningServer(app) as url:
        def call(_):
            return httpx.post(url + "/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": 60}, timeout=60)

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(call, range(6)))
        codes = sorted(r.status_code for r in replies)
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        busy = next(r for r in replies if r.status_code == 429).json()["error"]["message"]
        assert "busy" in busy and "\n" not in busy
        assert call(0).status_code == 200


def test_text_stream_holds_back_stop_prefixes():
    stream = TextStream(TinyTokenizer(), stop=["9 9"])
    deltas = [stream.push(t) for t in (5, 9, 7, 9, 9, 4)][:5]
    assert "".join(d for d, _ in deltas) == "5 9 7 " and deltas[-1][1]


def test_policy_with_batch_state_batches_its_cohort(tiny, client):
    """SnapKV keeps per-batch state: requests arriving together share one left-padded prefill and
    batch; each still gets what it gets alone."""
    extra = {"policy": "snapkv", "budget": 20, "policy_params": SMALL}

    def call(prompt):
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, extra_body=extra)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(call, PROMPTS[:3]))
    for prompt, out in zip(PROMPTS[:3], outs):
        assert out.choices[0].text == reference(tiny, prompt, "snapkv", 10, budget=20, **SMALL)


def test_a_failing_generation_is_a_one_line_500_and_serving_goes_on(server, client, monkeypatch):
    import tokensift.serve.scheduler as scheduler

    real = scheduler.choose_next

    def broken(logits, temperature, top_p, generator):
        if temperature == 1.25:
            raise RuntimeError("boom\nsecond line")
        return real(logits, temperature, top_p, generator)

    monkeypatch.setattr(scheduler, "choose_next", broken)
    reply = httpx.post(server + "/v1/completions", json={"prompt": "5 6", "max_tokens": 3, "temperature": 1.25}, timeout=30)
    assert reply.status_code == 500 and reply.json()["error"]["message"] == "generation failed: RuntimeError: boom"
    assert client.completions.create(model="tiny", prompt="5 6", max_tokens=2).choices[0].text


def test_serve_flag_errors_are_one_line(monkeypatch, capsys):
    from tokensift import cli

    monkeypatch.setattr("sys.argv", ["tokensift", "serve", "--policy", "nope"])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown policy 'nope'")


def test_n_beyond_the_running_slots_is_refused(server):
    reply = httpx.post(server + "/v1/completions", json={"prompt": "5 6", "max_tokens": 2, "n": 5}, timeout=30)
    assert reply.status_code == 400 and "n must be between 1 and 4" in reply.json()["error"]["message"]
