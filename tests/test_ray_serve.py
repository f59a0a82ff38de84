"""``tokensift serve --replicas 2`` on a local Ray (2 CPUs): the CLI starts two replicas of the
single server's app behind one endpoint; the official openai client gets the single server's
answers from both replicas."""

import concurrent.futures
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

for _module in ("fastapi", "uvicorn", "sse_starlette", "httpx", "openai"):
    pytest.importorskip(_module)  # the serve extra (requirements-serve.txt)
ray = pytest.importorskip("ray")  # the ray extra (requirements-ray.txt)

import httpx  # noqa: E402
import openai  # noqa: E402

from serve_helpers import free_port  # noqa: E402
from tokensift.errors import TokensiftError  # noqa: E402
from tokensift.generate import generate  # noqa: E402
from tokensift.models import load_model  # noqa: E402
from tokensift.policies import build_policy  # noqa: E402
from tokensift.serve.replicas import REPLICA_HEADER  # noqa: E402

PROMPT = "The printing press spread across Europe within fifty years, and the price of books"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama with the embedded tokenizer (and its chat template), saved for the replicas."""
    from tokensift.bench.tasks import default_tokenizer

    tokenizer = default_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # random weights: every request runs to max_tokens
    folder = tmp_path_factory.mktemp("ray_serve") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(local_ray, tiny_folder, tmp_path_factory):
    """``tokensift serve --replicas 2 --ray-address ...`` in a subprocess, until the module ends."""
    port = free_port()
    command = [str(Path(sys.executable).with_name("tokensift")), "serve", "--replicas", "2", "--ray-address", local_ray,
               "--model", str(tiny_folder), "--served-name", "tiny", "--port", str(port), "--replica-cpus", "1",
               "--max-tokens", "8", "--max-batch", "4", "--kernels", "stock"]
    log = tmp_path_factory.mktemp("ray_serve_log") / "stderr.txt"
    with open(log, "wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr)
    timer = threading.Timer(300, process.kill)  # a start that hangs fails the test instead
    timer.start()
    ready = process.stdout.readline().decode()  # printed once every replica is up (or EOF if it failed)
    timer.cancel()
    assert "serving at" in ready, log.read_text()[-3000:]
    url = f"http://127.0.0.1:{port}"
    yield url
    process.send_signal(signal.SIGINT)  # Ctrl-C: the app is deleted from the cluster
    assert process.wait(timeout=300) == 0  # as long as a start may take: a loaded machine shuts down slowly too


@pytest.fixture(scope="module")
def reference(tiny_folder):
    model, tokenizer = load_model(str(tiny_folder))
    model.generation_config.eos_token_id = None
    return lambda prompt, policy=None, tokens=8: generate(
        model, tokenizer, prompt, policy=policy or build_policy("full"), max_new_tokens=tokens).text[0]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)


def test_two_replicas_answer_like_the_single_server(server, client, reference):
    from ray import serve

    replicas = serve.status().applications["tokensift"].deployments["tokensift"].replica_states
    assert replicas == {"RUNNING": 2}
    want = reference(PROMPT, tokens=12)

    def call(_):
        reply = httpx.post(server + "/v1/completions", timeout=120,
                           json={"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
        return reply.status_code, reply.headers[REPLICA_HEADER], reply.json()["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(call, range(16)))
    assert {code for code, _, _ in replies} == {200}
    assert {text for _, _, text in replies} == {want}
    assert len({replica for _, replica, _ in replies}) == 2  # both replicas served


def test_openai_client_streams_chats_and_picks_a_policy(client, reference):
    streamed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == reference(PROMPT)
    snap = client.completions.create(model="tiny", prompt=PROMPT * 6, max_tokens=8, temperature=0,
                                     extra_body={"policy": "streaming_llm", "budget": 48})
    assert snap.tokensift["policy"] == "streaming_llm"
    assert snap.choices[0].text == reference(PROMPT * 6, build_policy("streaming_llm", budget=48))
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
                                          temperature=0)
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 6
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_bad_requests_are_one_line_4xx_through_the_proxy(server, client):
    for body, words in (({"prompt": "Hi", "policy": "h2o_typo"}, "unknown policy"),
                        ({"prompt": "Hi", "policy": "h2o", "budget": -1}, "budget")):
        reply = httpx.post(server + "/v1/completions", json={"model": "tiny", "max_tokens": 4, **body}, timeout=60)
        message = reply.json()["error"]["message"]
        assert reply.status_code == 400 and words in message and "\n" not in message
    broken = httpx.post(server + "/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"]["message"] == "request body is not valid JSON"
    assert client.completions.create(model="tiny", prompt="Hello", max_tokens=2, temperature=0).choices[0].text


def test_replica_flags_and_a_missing_ray_are_one_line_errors(monkeypatch):
    from tokensift.ray_cluster import require_ray
    from tokensift.serve.protocol import ServerDefaults
    from tokensift.serve.replicas import run_replicas

    with pytest.raises(TokensiftError, match="--replicas must be >= 1"):
        run_replicas(None, "127.0.0.1", 8000, ServerDefaults(), replicas=0, address=None)
    with pytest.raises(TokensiftError, match="no Ray cluster answers at 127.0.0.1:1"):
        run_replicas(None, "127.0.0.1", 8000, ServerDefaults(), replicas=2, address="127.0.0.1:1")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the ray extra were not installed
    with pytest.raises(TokensiftError) as error:
        require_ray("tokensift bench --ray")
    assert str(error.value) == ("tokensift bench --ray needs Ray (ray is missing): pip install 'tokensift[ray]' "
                                "(or pip install -r requirements-ray.txt)")


def test_a_client_that_goes_away_frees_its_replica_slot(server):
    """Ray Serve cancels the handler of a client that disconnected: the replica stops decoding for it
    (8,000 tokens would keep it busy far longer than the 15 s allowed)."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/v1/completions", timeout=3,
                   json={"model": "tiny", "prompt": PROMPT, "max_tokens": 8000, "temperature": 0})
    gone, running = time.monotonic(), {}
    while len(running) < 2 or any(running.values()):
        assert time.monotonic() - gone < 15, f"a replica still decodes for the client that left: {running}"
        reply = httpx.get(server + "/health", timeout=5)
        running[reply.headers[REPLICA_HEADER]] = reply.json()["running"] + reply.json()["queued"]
        time.sleep(0.2)
