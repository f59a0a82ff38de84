"""One llama.cpp generation for the spec-fresh suite's ``llamacpp_*`` arms, run by the Python of a
separate virtualenv that holds llama-cpp-python (it compiles for many minutes, so it is not a
tokensift dependency; as for kvpress, it lives in its own environment).

Standalone on purpose: it imports neither torch nor tokensift, only llama_cpp and the standard
library. Reads a JSON job from the file named on the command line (``gguf``, ``input_ids``,
``new_tokens``, ``eos_ids``, ``threads``, ``lookup``: 0 for plain greedy, N for llama-cpp-python's
prompt lookup decoding with N drafted tokens) and prints one JSON line with what tokensift's
``generate --json`` reports: decode tokens/s = (new tokens - 1) / (time of the last token - time
of the first; the first token comes out of the prefill), tokens per step = (new tokens - 1) /
decode calls of ``Llama.eval``. llama.cpp runs the GGUF's quantized weights natively (Q4_1 for
the embedded SmolLM2), where tokensift dequantizes them to fp32.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def timed_generate(llm, input_ids: list[int], new_tokens: int, stop_ids: set[int]) -> dict:
    """One greedy generation; times every token and counts the model calls of the decode."""
    llm.reset()
    calls = []
    original = llm.eval

    def counted(tokens):
        calls.append(len(tokens))
        return original(tokens)

    llm.eval = counted  # an instance attribute: Llama.generate calls self.eval
    start = time.perf_counter()
    times, tokens = [], []
    try:
        for token in llm.generate(input_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())
            tokens.append(int(token))
            if token in stop_ids or len(tokens) >= new_tokens:
                break
    finally:
        del llm.eval
    decode = times[-1] - times[0]
    steps = calls[1:]  # the first call is the prompt
    return {"token_ids": tokens, "new_tokens": len(tokens), "prompt_tokens": len(input_ids),
            "prefill_seconds": times[0] - start, "decode_seconds": decode,
            "tokens_per_second": (len(tokens) - 1) / decode if decode > 0 and len(tokens) > 1 else float("nan"),
            "steps": len(steps), "accepted_per_step": (len(tokens) - 1) / len(steps) if steps else float("nan"),
            "evaluated_per_step": sum(steps) / len(steps) if steps else float("nan")}


def run_job(job: dict) -> dict:
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = LlamaPromptLookupDecoding(num_pred_tokens=job["lookup"]) if job["lookup"] else None
    llm = Llama(model_path=job["gguf"], n_ctx=len(job["input_ids"]) + job["new_tokens"] + 64, n_threads=job["threads"],
                n_threads_batch=job["threads"], draft_model=draft, seed=0, verbose=False)
    stop_ids = {llm.token_eos(), *job.get("eos_ids", [])}
    return timed_generate(llm, job["input_ids"], job["new_tokens"], stop_ids)


def main() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("llama_cpp is not importable here: run this worker with the Python of a venv holding llama-cpp-python")
    print(json.dumps(run_job(json.loads(Path(sys.argv[1]).read_text()))))


if __name__ == "__main__":
    main()
