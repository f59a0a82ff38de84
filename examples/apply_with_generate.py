"""Use a tokensift policy inside transformers' own ``model.generate`` with ``tokensift.apply``.

    python examples/apply_with_generate.py --policy streaming_llm --budget 64

Inside the ``with`` block the model runs the tokensift attention function and the cache keeps
only what the policy selects; after it, the model is exactly as it was.
"""

import argparse

import tokensift
from tokensift import load_model


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--policy", default="streaming_llm")
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    model.set_attn_implementation("sdpa")  # as a plain transformers model would be
    prompt = "Once upon a time, in a small village by the sea, there lived an old fisherman who " * 4
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    with tokensift.apply(model, args.policy, budget=args.budget) as cache:
        output = model.generate(**inputs, past_key_values=cache, max_new_tokens=args.max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        kept = cache.kv_tokens()
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(text)
    print(f"{args.policy}: {kept:.0f} tokens kept per layer and KV head of {output.shape[1] - 1} seen; "
          f"attention back to {model.config._attn_implementation!r}")
    return {"text": text, "kept": kept, "attention": model.config._attn_implementation}


if __name__ == "__main__":
    main()
