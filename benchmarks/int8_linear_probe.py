"""Issue 22: what int8 weight kernels from PyTorch itself give on this CPU for SmolLM2's linear
layers and for a whole decode / verification forward, against fp32 (stock MKL and packed oneDNN).

int8 here is ``torch.ao.quantization.quantize_dynamic`` (int8 weights, activations quantized per
call, fbgemm/x86 kernels): PyTorch's own quantized linear. Rounds alternate the variants and keep
each one's fastest time (load from other processes hits them alike). 1 thread.

    OMP_NUM_THREADS=1 python benchmarks/int8_linear_probe.py > out.json
"""

import copy
import json
import os
import time

import torch

torch.set_num_threads(1)


def best(fn, rounds):
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    from tokensift.engine import make_cache
    from tokensift.kernels import packed_linears
    from tokensift.models import load_model
    from tokensift.policies import build_policy
    from tokensift.speculative.tree import DraftTree

    model, _ = load_model(None)
    qmodel = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    out = {"threads": torch.get_num_threads(), "engine": torch.backends.quantized.engine, "torch": torch.__version__,
           "load_before": os.getloadavg()[0], "linear_ms": {}, "forward_ms": {}}
    shapes = {"q_proj 576x576": (576, 576), "k_proj 576x192": (576, 192), "up 576x1536": (576, 1536),
              "down 1536x576": (1536, 576), "lm_head 576x49152": (576, 49152)}
    with torch.inference_mode():
        for name, (fan_in, fan_out) in shapes.items():
            linear = torch.nn.Linear(fan_in, fan_out, bias=False)
            qlinear = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8)
            packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
            for rows in (1, 4, 8):
                x = torch.randn(1, rows, fan_in)
                variants = {"fp32_stock": lambda: linear(x),
                            "fp32_packed": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
                            "int8_dynamic": lambda: qlinear(x)}
                res = {k: [] for k in variants}
                for _ in range(5):
                    for k, fn in variants.items():
                        res[k].append(best(fn, 20))
                out["linear_ms"][f"{name} rows={rows}"] = {k: round(min(v) * 1000, 3) for k, v in res.items()}
        ids = torch.randint(10, 40000, (1, 400), generator=torch.Generator().manual_seed(0))

        def forward_time(m, q, packed_kernels):
            cache = make_cache(m, build_policy("full"))
            with packed_linears(m, packed_kernels):
                m.model(input_ids=ids[:, :300], past_key_values=cache, use_cache=True)
                tree = DraftTree.chain(int(ids[0, 300]), ids[0, 301:300 + q].tolist())
                mask = tree.attention_mask(300) if q > 1 else None

                def step():
                    h = m.model(input_ids=ids[:, 300:300 + q], attention_mask=mask, position_ids=tree.position_ids(300),
                                past_key_values=cache, use_cache=True).last_hidden_state
                    m.lm_head(h)
                    cache.keep_new_tokens(q, [])

                return best(step, 5)

        for q in (1, 4, 8):
            res = {"fp32_stock": [], "fp32_packed": [], "int8_dynamic": []}
            for _ in range(3):
                res["fp32_stock"].append(forward_time(model, q, False))
                res["fp32_packed"].append(forward_time(model, q, True))
                res["int8_dynamic"].append(forward_time(qmodel, q, False))
            out["forward_ms"][f"q={q}"] = {k: round(min(v) * 1000, 1) for k, v in res.items()}
        # does int8 keep the greedy output? (relative to fp32: it is a different model)
        prompt = ids[:, :200]
        a = model.generate(prompt, max_new_tokens=32, do_sample=False)[0, 200:].tolist()
        b = qmodel.generate(prompt, max_new_tokens=32, do_sample=False)[0, 200:].tolist()
        out["int8_greedy_same_as_fp32_first_32"] = sum(x == y for x, y in zip(a, b))
    out["load_after"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
