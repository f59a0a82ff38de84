"""Compress a long document first, then ask about it (the question never steers the selection).

    python examples/compress_then_ask.py                       # the embedded SmolLM2, CPU, fp32
    python examples/compress_then_ask.py --device auto --dtype bfloat16 --policies "full,adakv(snapkv)"

Each policy answers from the same document: the full cache, an eviction policy (keeps
``budget`` tokens per layer and KV head) and a sparse reader (keeps every token, reads
``budget`` of them per step). On this task eviction tends to lose the passkey before the
question arrives; sparse reading keeps it.
"""

import argparse

from tokensift import build_policy, load_model
from tokensift.generate import generate

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")


def haystack(sentences: int, passkey: str) -> str:
    """``sentences`` filler sentences with the passkey in the middle."""
    lines = [FILLER[i % len(FILLER)] for i in range(sentences)]
    lines.insert(sentences // 2, f"The passkey is {passkey}. Remember it. {passkey} is the passkey.")
    return " ".join(lines)


def policy_for(name: str, budget: int):
    """``name`` at ``budget`` (the full cache takes none)."""
    return build_policy(name) if name == "full" else build_policy(name, budget=budget)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="smollm2 (default), gemma3, a folder, a .gguf")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--policies", default="full,snapkv,topk_attention", help="comma-separated policies")
    parser.add_argument("--budget", type=int, default=128, help="tokens kept (or read) per layer and KV head")
    parser.add_argument("--sentences", type=int, default=200, help="length of the document")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    document = haystack(args.sentences, "68213")
    results = []
    for name in args.policies.split(","):
        result = generate(model, tokenizer, document, question=" What is the passkey? The passkey is",
                          policy=policy_for(name.strip(), args.budget), max_new_tokens=args.max_new_tokens)
        print(f"{result.policy:>15}: {result.text[0].strip()!r} (KV held {result.kv_bytes / 2**20:.2f} MiB, "
              f"{result.kv_bytes_full / 2**20:.2f} MiB for a full cache of {result.prompt_tokens} tokens)")
        results.append(result.as_dict())
    return results


if __name__ == "__main__":
    main()
