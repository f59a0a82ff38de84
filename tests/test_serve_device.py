"""tokensift serve with the model on a device and dtype: answers equal ``generate`` on the same
model (bf16 on the CPU here; CUDA with the ``gpu`` marker where a device is lent)."""

import concurrent.futures

import pytest
import torch

for _module in ("fastapi", "uvicorn", "httpx", "openai"):
    pytest.importorskip(_module)  # the serve extra (requirements-serve.txt)

import openai  # noqa: E402

from conftest import tiny_llama  # noqa: E402
from serve_helpers import RunningServer  # noqa: E402
from test_serve import PROMPTS, ChatTokenizer  # noqa: E402
from tokensift.generate import generate  # noqa: E402
from tokensift.policies import build_policy  # noqa: E402
from tokensift.serve.app import create_app  # noqa: E402
from tokensift.serve.protocol import ServerDefaults  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
PLACES = [("cpu", torch.bfloat16), pytest.param("cuda", torch.float32, marks=[pytest.mark.gpu, CUDA])]


@pytest.mark.parametrize("device, dtype", PLACES)
def test_served_answers_equal_generate_on_the_device(device, dtype):
    model = tiny_llama().to(device=device, dtype=dtype)
    model.generation_config.eos_token_id = None
    tokenizer = ChatTokenizer()
    app = create_app(model, tokenizer, "tiny", ServerDefaults(max_tokens=8), max_batch=4, max_queue=16, packed=False)
    extra = {"policy": "snapkv", "budget": 24, "policy_params": {"window": 4, "n_sink": 2}}
    with RunningServer(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)

        def ask(prompt):
            out = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, extra_body=extra)
            assert out.tokensift["policy"] == "snapkv"
            return out.choices[0].text

        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two requests: they may share a batch
            answers = list(pool.map(ask, PROMPTS[:2]))
    expected = [generate(model, tokenizer, p, policy=build_policy("snapkv", budget=24, window=4, n_sink=2),
                         max_new_tokens=8).text[0] for p in PROMPTS[:2]]
    assert answers == expected
