"""tokensift serve on the embedded SmolLM2: the official openai client against a real server."""

import concurrent.futures

import pytest

for _module in ("fastapi", "uvicorn", "sse_starlette", "httpx", "openai"):
    pytest.importorskip(_module)  # the serve extra (requirements-serve.txt)

import httpx  # noqa: E402
import openai  # noqa: E402

from serve_helpers import RunningServer
from tokensift.generate import generate
from tokensift.models import load_model
from tokensift.policies import build_policy
from tokensift.serve.app import create_app
from tokensift.serve.protocol import ServerDefaults

pytestmark = pytest.mark.real

CONTEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based inks and a wooden press. Within fifty years, printing "
    "had spread to more than two hundred cities across Europe, and the price of books fell sharply. "
) * 3


@pytest.fixture(scope="module")
def smollm2():
    return load_model()


@pytest.fixture(scope="module")
def server(smollm2):
    model, tokenizer = smollm2
    with RunningServer(create_app(model, tokenizer, "smollm2", ServerDefaults(max_tokens=16), packed=False)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)


def test_plain_streamed_and_policy_requests(smollm2, client):
    model, tokenizer = smollm2
    want = generate(model, tokenizer, CONTEXT, max_new_tokens=12).text[0]
    plain = client.completions.create(model="smollm2", prompt=CONTEXT, max_tokens=12, temperature=0)
    assert plain.choices[0].text == want
    streamed = client.completions.create(model="smollm2", prompt=CONTEXT, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want
    policy = dict(policy="snapkv", budget=64)
    snap = client.completions.create(model="smollm2", prompt=CONTEXT, max_tokens=12, temperature=0, extra_body=policy)
    assert snap.choices[0].text == generate(model, tokenizer, CONTEXT, policy=build_policy(**{"name": "snapkv", "budget": 64}),
                                            max_new_tokens=12).text[0]
    assert snap.tokensift["policy"] == "snapkv" and snap.tokensift["kv_bytes"] < plain.tokensift["kv_bytes"] / 2


def test_chat_concurrent_and_speculation(smollm2, client):
    """A chat request, a streamed chat request and a speculative one at the same time."""
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]

    def chat(stream):
        reply = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0, stream=stream)
        return "".join(c.choices[0].delta.content or "" for c in reply) if stream else reply.choices[0].message.content

    def speculative():
        return client.completions.create(model="smollm2", prompt=CONTEXT, max_tokens=16, temperature=0,
                                         extra_body={"speculate": "prompt_lookup", "tree_nodes": 4})

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        plain, streamed, spec = pool.submit(chat, False), pool.submit(chat, True), pool.submit(speculative)
        assert plain.result() == streamed.result() and "Paris" in plain.result()
        model, tokenizer = smollm2
        assert spec.result().choices[0].text == generate(model, tokenizer, CONTEXT, max_new_tokens=16).text[0]
        assert spec.result().tokensift["accepted_per_step"] > 1


@pytest.mark.parametrize("body, words", [
    ({"prompt": "Hi", "policy": "h2o_typo"}, "unknown policy"),
    ({"prompt": "Hi", "policy": "h2o", "budget": -1}, "budget"),
    ({"prompt": "word " * 9000}, "exceeds the model's context"),
])
def test_bad_requests_keep_the_server_serving(server, client, body, words):
    reply = httpx.post(server + "/v1/completions", json={"model": "smollm2", "max_tokens": 4, **body}, timeout=60)
    assert reply.status_code == 400 and words in reply.json()["error"]["message"]
    broken = httpx.post(server + "/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "\n" not in broken.json()["error"]["message"]
    assert client.completions.create(model="smollm2", prompt="Hello", max_tokens=2, temperature=0).choices[0].text
