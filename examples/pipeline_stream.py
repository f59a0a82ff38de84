"""The ``tokensift-generation`` pipeline: a context, a question asked after compression, a
``GenerationConfig`` and a streamer, as with any transformers pipeline.

    python examples/pipeline_stream.py --policy snapkv --budget 64
"""

import argparse

from transformers import GenerationConfig, TextStreamer, pipeline

import tokensift.integration  # noqa: F401  (registers the "tokensift-generation" task)
from tokensift import load_model


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--policy", default="snapkv")
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    pipe = pipeline("tokensift-generation", model=model, tokenizer=tokenizer, policy=args.policy, budget=args.budget)
    context = ("Marie Curie was a physicist and chemist who conducted pioneering research on radioactivity. "
               "She was the first woman to win a Nobel Prize and the only person to win it in two sciences. ") * 3
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, repetition_penalty=1.2, stop_strings=["."])
    output = pipe(context=context, question="\nQuestion: What did Marie Curie win?\nAnswer: She", generation_config=config,
                  streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    print(f"[{output[0]['policy']}: KV {output[0]['kv_bytes']} of {output[0]['kv_bytes_full']} bytes]")
    return output


if __name__ == "__main__":
    main()
