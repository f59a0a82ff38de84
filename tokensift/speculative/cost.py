"""The measured cost of verifying q tokens in one forward on this machine.

A forward of q new tokens = the transformer body over q tokens + the output layer over the
rows whose logits are needed (all q with the stock forward; only the accepted path + 1 with
the lazy head, see ``engine``). Both parts are timed at a given context length and thread
count, and cached on disk (``~/.cache/tokensift/spec/``), since they are a property of the
machine. The costs are relative: ``relative(1, 1) == 1`` is one plain decoding step.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tokensift.devices import clock, model_device

MIN_OBSERVATIONS = 3  # real steps of a size before their average replaces the offline curve
SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)
HEAD_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def _interp(table: dict[int, float], x: float) -> float:
    keys = sorted(table)
    if x <= keys[0]:
        return table[keys[0]] * x / keys[0] if x < keys[0] else table[keys[0]]
    for low, high in zip(keys, keys[1:]):
        if x <= high:
            t = (x - low) / (high - low)
            return table[low] * (1 - t) + table[high] * t
    return table[keys[-1]] * x / keys[-1]


@dataclass
class CostModel:
    body: dict[int, float]  # q -> seconds (transformer body, q new tokens)
    head: dict[int, float]  # rows -> seconds (output layer)
    overhead: float = 0.0  # seconds of drafting/bookkeeping per speculative step
    context: int = 512
    threads: int = 1
    meta: dict = field(default_factory=dict)
    observed: dict = field(default_factory=dict)  # size -> EMA seconds of real decode steps (online)
    observed_counts: dict = field(default_factory=dict)  # size -> real steps seen
    online: bool = True  # calibrate from real step times (off for synthetic curves: deterministic tests)

    def bucket(self, q: int) -> int:
        return next((size for size in self.sizes if size >= q), self.sizes[-1])

    def observe(self, q: int, seconds: float) -> None:
        """Online calibration from a real decode step of ``q`` tokens (drafting, verification and
        rollback included): the offline curve, timed in isolation, misses what the machine's
        load and the loop's own overhead do to it."""
        if not self.online:
            return
        size = self.bucket(q)
        count = self.observed_counts.get(size, 0) + 1
        self.observed_counts[size] = count
        old = self.observed.get(size, seconds)
        weight = max(1.0 / count, 0.2)  # a plain mean of the first steps, then a forgetting average
        self.observed[size] = (1 - weight) * old + weight * seconds

    def trusted(self) -> dict[int, float]:
        """Observed step seconds of the sizes seen often enough for one slow step not to decide."""
        return {s: v for s, v in self.observed.items() if self.observed_counts.get(s, 0) >= MIN_OBSERVATIONS}

    @property
    def sizes(self) -> list[int]:
        return sorted(self.body)

    def seconds(self, q: int, rows: float, lazy: bool = False) -> float:
        """Body over ``q`` tokens + the output layer over ``rows`` rows (one batched call, or
        ``lazy``: one single-row call per row, as the lazy verifier does)."""
        head = self.head[1] * max(rows, 1.0) if lazy else _interp(self.head, max(rows, 1.0))
        return _interp(self.body, q) + head

    def relative(self, q: int, rows: float | None = None, speculative: bool = False, lazy: bool = False) -> float:
        rows = q if rows is None else rows
        trusted = self.trusted() if speculative else {}
        if 1 in trusted and len(trusted) > 1:
            size = self.bucket(q)
            if size in trusted:
                return trusted[size] / trusted[1]
            # a size not measured enough: the offline curve, scaled by how far off it was at the measured ones
            scales = [trusted[s] / self.seconds(s, min(s, 2.0), lazy) for s in trusted if s > 1]
            scale = sorted(scales)[len(scales) // 2] / (trusted[1] / self.seconds(1, 1))
            return max(self.seconds(q, rows, lazy) / self.seconds(1, 1) * scale, 1.0)
        extra = self.overhead if speculative and q > 1 else 0.0
        return (self.seconds(q, rows, lazy) + extra) / self.seconds(1, 1)

    def curve(self, lazy: bool, rows: float = 2.0) -> dict[int, float]:
        """cost(q)/cost(1) per measured q: stock (output layer on all q rows) or lazy
        (single-row output layer on ``rows`` rows: the accepted path + 1)."""
        return {q: round(self.relative(q, min(q, rows) if lazy else q, lazy=lazy), 3) for q in self.sizes}

    @classmethod
    def synthetic(cls, slope: float = 0.08) -> CostModel:
        """A made-up linear-ish curve (tests)."""
        return cls({q: 1.0 + slope * (q - 1) for q in SIZES}, {r: 0.0 for r in HEAD_ROWS}, 0.0, online=False)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        data["observed"], data["observed_counts"] = {}, {}  # online calibration belongs to a run, not to the machine file
        path.write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: Path) -> CostModel:
        data = json.loads(Path(path).read_text())
        data["body"] = {int(k): v for k, v in data["body"].items()}
        data["head"] = {int(k): v for k, v in data["head"].items()}
        data["observed"] = {int(k): v for k, v in data.get("observed", {}).items()}
        data["observed_counts"] = {int(k): v for k, v in data.get("observed_counts", {}).items()}
        return cls(**data)


@torch.inference_mode()
def measure_cost(model, context: int = 512, sizes=SIZES, head_rows=HEAD_ROWS, repeats: int = 5) -> CostModel:
    """Time the body over q new tokens (over a ``context``-token cache) and the output layer.

    Rounds go over all sizes in turn and each size keeps its fastest run, so a burst of load
    from other processes hits every size alike rather than one.
    """
    from tokensift.engine import make_cache
    from tokensift.policies import build_policy
    from tokensift.speculative.tree import DraftTree

    config = model.config.get_text_config(decoder=True)
    device = model_device(model)
    cache = make_cache(model, build_policy("full"))
    generator = torch.Generator().manual_seed(0)
    host = generator.device  # drawn on the host (the same ids on every device), then moved
    ids = torch.randint(10, config.vocab_size, (1, context + max(sizes)), generator=generator, device=host).to(device)
    out = model.model(input_ids=ids[:, :context], past_key_values=cache, use_cache=True)
    head_layer = model.get_output_embeddings()
    # the model's own hidden states (an exact int8 head's cost depends on them: tokensift.exact_head)
    last = out.last_hidden_state[0, -max(head_rows):]
    hidden = last[torch.arange(max(head_rows), device=device) % last.shape[0]][None]  # repeated if the context is short
    jobs = {}
    for q in sizes:
        tree = DraftTree.chain(int(ids[0, context]), ids[0, context + 1:context + q].tolist())
        mask = tree.attention_mask(context, device) if q > 1 else None
        positions = tree.position_ids(context, device)

        def run(q=q, mask=mask, positions=positions):
            model.model(input_ids=ids[:, context:context + q], attention_mask=mask, position_ids=positions,
                        past_key_values=cache, use_cache=True)
            cache.keep_new_tokens(q, [])

        jobs[("body", q)] = run
    for rows in head_rows:
        jobs[("head", rows)] = lambda rows=rows: head_layer(hidden[:, :rows])
    best = {key: float("inf") for key in jobs}
    for _ in range(repeats + 1):  # the first round warms up
        for key, job in jobs.items():
            start = clock(device)
            job()
            best[key] = min(best[key], clock(device) - start)
    body = {q: best[("body", q)] for q in sizes}
    head = {rows: best[("head", rows)] for rows in head_rows}
    return CostModel(body, head, 0.0, context, torch.get_num_threads())


def default_cost_path(model, kernels: str = "stock") -> Path:
    from tokensift.models import cache_root

    config = model.config.get_text_config(decoder=True)
    name = f"{type(model).__name__}-{config.hidden_size}x{config.num_hidden_layers}-v{config.vocab_size}"
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32:  # a curve per device and dtype
        name += f"-{weight.device.type}-{str(weight.dtype).removeprefix('torch.')}"
    return cache_root() / "spec" / f"cost-{name}-t{torch.get_num_threads()}-{kernels}.json"


def cost_for(model, path: Path | None = None, refresh: bool = False, kernels: str = "stock") -> CostModel:
    """The cached cost curve of ``model`` at the current thread count and with the current
    ``kernels`` (``stock`` or ``packed``: measured as the model runs now), measured once."""
    path = path or default_cost_path(model, kernels)
    if path.exists() and not refresh:
        try:
            return CostModel.load(path)
        except (ValueError, KeyError, TypeError):
            pass
    cost = measure_cost(model)
    cost.save(path)
    return cost
