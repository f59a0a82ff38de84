"""Continuous batching: one worker thread runs every forward.

Requests wait in a bounded queue. The worker admits them while there are free slots (one slot
per sequence): a request whose policy (with the same parameters) is already decoding joins that
running batch: it is prefilled alone, its first token sampled, and its rows repacked into the
batch's left-padded cache (see ``batch``). Otherwise, while fewer than ``max_groups`` batches
run, the oldest request starts a new batch, prefilled together with the waiting requests of the
same policy (one left-padded forward). A policy whose cache keeps per-batch state (SnapKV's
queries, a quantized store...) takes no joiners. Each round the worker runs one decode step of
every batch; finished and cancelled rows leave at once, freeing their slot and cache share.
Speculative requests run one at a time in a second thread on a shared ``Speculator`` (Token
Recycling's table holds token ids only, by design); the two threads take turns on the model
through one lock, one step at a time.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field

import torch

from tokensift.cache import SelectingCache, SelectingLayer
from tokensift.devices import model_device
from tokensift.engine import make_cache
from tokensift.generate import choose_next, left_pad
from tokensift.kernels import packed_linears
from tokensift.serve.batch import batch_independent, mergeable, padding_mask, repack, row_lengths
from tokensift.serve.protocol import Job
from tokensift.serve.text import TextStream


class QueueFull(Exception):
    """The waiting queue is at its bound (HTTP 429)."""


class Cancelled(Exception):
    """Raised inside a speculative run whose client went away."""


@dataclass
class Sequence:
    """One choice of one request: its tokens, text and sampling state."""

    request: "Request"
    index: int
    stream: TextStream
    generator: torch.Generator
    tokens: list = field(default_factory=list)
    finish_reason: str | None = None
    kv: dict = field(default_factory=dict)
    retired: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int, eos: set[int]) -> None:
        """Record a token, send its text, and finish on EOS, a stop string or max_tokens."""
        self.tokens.append(token)
        self.request.metrics.token()
        if token in eos:
            self.finish("stop")
            return
        delta, stopped = self.stream.push(token)
        if delta:
            self.request.emit(("delta", self.index, delta))
        if stopped:
            self.finish("stop")
        elif len(self.tokens) >= self.request.job.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        if self.done:
            return
        rest = self.stream.flush() if reason != "cancelled" else ""
        if rest:
            self.request.emit(("delta", self.index, rest))
        self.finish_reason = reason
        self.request.emit(("finish", self.index, reason))

    def retire(self, kv: dict) -> None:
        """Record what the cache held for this sequence; the request ends with its last one."""
        self.kv, self.retired = kv, True
        self.request.sequence_done()


class Request:
    """A job plus the thread-safe channel back to its HTTP handler."""

    ids = itertools.count()

    def __init__(self, job: Job, tokenizer, emit, metrics):
        self.job, self.metrics = job, metrics
        self.id = next(self.ids)
        self.emit = emit  # called from the worker threads; must be thread-safe
        self.cancelled = False
        self.batched = False
        self.sequences = [
            Sequence(self, i, TextStream(tokenizer, job.stop), torch.Generator().manual_seed(job.seed + i))
            for i in range(job.n)
        ]
        self.open = job.n
        self.arrived = time.monotonic()
        self.key = policy_key(job.policy)

    def sequence_done(self) -> None:
        self.open -= 1
        if self.open == 0:
            self.emit(("end", self.summary()))

    def summary(self) -> dict:
        kv = [s.kv for s in self.sequences if s.kv]
        def total(key: str) -> int:
            return sum(k.get(key, 0) for k in kv)

        return {
            "policy": self.job.policy.name,
            "params": self.job.policy.params(),
            "speculate": self.job.speculate,
            "batched": self.batched,
            "kv_bytes": total("kv_bytes"),
            "kv_bytes_full": total("kv_bytes_full"),
            "kv_tokens": max((k.get("kv_tokens", 0.0) for k in kv), default=0.0),
            "completion_tokens": sum(len(s.tokens) for s in self.sequences),
            **({"accepted_per_step": kv[0]["accepted_per_step"]} if kv and "accepted_per_step" in kv[0] else {}),
        }

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Group:
    """A running batch: rows that share one cache (and so one policy)."""

    key: str
    policy: object
    cache: SelectingCache
    mask: torch.Tensor
    rows: list
    joinable: bool


def row_kv(cache: SelectingCache, row: int, batch: int) -> dict:
    """What the cache holds for one row: its share of the K/V tensors (padding slots of the shared
    batch included), what a full cache would hold for its real tokens, and real tokens kept."""
    full, kept = 0, []
    for layer in cache.layers:
        if isinstance(layer, SelectingLayer) and layer.keys is not None:
            _, heads, _, dim = layer.keys.shape
            full += 2 * heads * dim * layer.keys.element_size() * int(layer.valid_seen[row])
            kept.append(float(layer.valid[row].sum(-1).float().mean()))
        elif getattr(layer, "keys", None) is not None:
            full += (layer.keys.nbytes + layer.values.nbytes) // batch
    return {"kv_bytes": cache.kv_bytes // batch, "kv_bytes_full": full,
            "kv_tokens": sum(kept) / max(len(kept), 1)}


class Scheduler:
    """Owns the model: admits queued requests into running batches and steps them."""

    def __init__(self, model, tokenizer, metrics, max_batch: int = 8, max_queue: int = 128, packed: bool = True,
                 max_groups: int = 2, patience: float = 10.0):
        self.model, self.tokenizer, self.metrics = model, tokenizer, metrics
        self.device = model_device(model)
        self.max_batch, self.max_queue, self.packed = max_batch, max_queue, packed
        self.max_groups, self.patience = max_groups, patience
        self.waiting: collections.deque[Request] = collections.deque()
        self.spec_waiting: collections.deque[Request] = collections.deque()
        self.groups: list[Group] = []
        self.spec_active = 0
        self.lock = threading.Lock()  # one forward at a time (the attention function is not reentrant)
        self.wake = threading.Condition()
        self.stopped = False
        self.speculators: dict = {}
        self.eos = eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.threads: list[threading.Thread] = []
        self._packed = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._packed = packed_linears(self.model, self.packed)
        self._packed.__enter__()
        for target in (self._run, self._run_speculative):
            thread = threading.Thread(target=target, daemon=True, name=f"tokensift-{target.__name__}")
            thread.start()
            self.threads.append(thread)

    def stop(self) -> None:
        with self.wake:
            self.stopped = True
            self.wake.notify_all()
        for thread in self.threads:
            thread.join(timeout=30)
        if self._packed is not None:
            self._packed.__exit__(None, None, None)

    def submit(self, request: Request) -> None:
        """Queue a request, or raise QueueFull."""
        with self.wake:
            if len(self.waiting) + len(self.spec_waiting) >= self.max_queue:
                raise QueueFull(f"server busy: {self.max_queue} requests already waiting; retry later")
            (self.spec_waiting if request.job.speculate else self.waiting).append(request)
            self.wake.notify_all()

    @property
    def running(self) -> int:
        return sum(len(g.rows) for g in self.groups) + self.spec_active

    @property
    def queued(self) -> int:
        return len(self.waiting) + len(self.spec_waiting)

    # --------------------------------------------------------------- batch worker
    def _run(self) -> None:
        while not self.stopped:
            self._admit()
            if not self.groups:
                self.metrics.kv_held = 0
                with self.wake:
                    if not self.waiting and not self.stopped:
                        self.wake.wait(timeout=0.5)
                continue
            for group in list(self.groups):
                try:
                    self._step(group)
                except Exception as error:  # fail this batch's requests, keep serving the others
                    self.groups.remove(group)
                    for request in {id(seq.request): seq.request for seq in group.rows}.values():
                        request.emit(("error", failure(error)))
            self.metrics.kv_held = sum(g.cache.kv_bytes for g in self.groups)
            if self.spec_active:
                time.sleep(0.001)  # let the speculative thread take its turn

    def _admit(self) -> None:
        while True:
            with self.wake:
                cohort = self._pick()
            if not cohort:
                return
            try:
                self._start(cohort)
            except Exception as error:  # a request must never take the worker down
                for request in cohort:
                    request.emit(("error", failure(error)))

    def _pick(self) -> list[Request]:
        """The next requests to start (call with ``wake`` held).

        A waiting request that can join a running batch of its policy goes first, unless the
        oldest one has waited ``patience`` seconds; otherwise, while there are fewer than
        ``max_groups`` batches, the oldest starts a new batch together with the waiting requests
        of the same policy that fit (one left-padded prefill).
        """
        while self.waiting and self.waiting[0].cancelled:
            self.waiting.popleft()
        free = self.max_batch - sum(len(g.rows) for g in self.groups)
        if not self.waiting or free <= 0:
            return []
        window = list(itertools.islice(self.waiting, 64))
        oldest = window[0]
        if time.monotonic() - oldest.arrived < self.patience:
            joinable = {g.key for g in self.groups if g.joinable}
            match = next((r for r in window if r.key in joinable and r.job.n <= free and not r.cancelled), None)
            if match is not None:
                self.waiting.remove(match)
                return [match]
        if len(self.groups) >= self.max_groups or oldest.job.n > free:
            return []
        cohort = [oldest]
        free -= oldest.job.n
        for request in window[1:] if batch_independent(oldest.job.policy) else []:
            if request.key == oldest.key and request.job.n <= free and not request.cancelled:
                cohort.append(request)
                free -= request.job.n
        for request in cohort:
            self.waiting.remove(request)
        return cohort

    @torch.inference_mode()
    def _start(self, cohort: list[Request]) -> None:
        """Prefill requests of one policy together (left-padded), sample their first tokens, and
        put their rows in a batch: a running one of the same policy when the cache allows."""
        sequences = [seq for request in cohort for seq in request.sequences]
        policy = cohort[0].job.policy
        cache = make_cache(self.model, policy)
        ids, mask = left_pad([seq.request.job.prompt_ids for seq in sequences], self.pad_id, self.device)
        with self.lock:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
        for request in cohort:
            self.metrics.prompt_tokens(len(request.job.prompt_ids) * request.job.n)
        logits = out.logits[:, -1].float().cpu()  # sampled on the host with each sequence's seeded generator
        for row, seq in enumerate(sequences):
            job = seq.request.job
            seq.push(int(choose_next(logits[row:row + 1], job.temperature, job.top_p, seq.generator)[0]), self.eos)
        group = Group(cohort[0].key, policy, cache, mask, sequences, mergeable(cache))
        target = next((g for g in self.groups if group.joinable and g.key == group.key and g.joinable
                       and mergeable(g.cache)), None)  # state a policy starts keeping mid-decode stops joins
        if target is not None:
            target.cache = repack(self.model, target.policy, self._row_refs(target.cache, len(target.rows))
                                  + self._row_refs(cache, len(sequences)))
            target.rows += sequences
            target.mask = padding_mask(row_lengths(target.cache), self.device)
            group = target
        else:
            self.groups.append(group)
        self._retire(group)

    @staticmethod
    def _row_refs(cache, count: int) -> list:
        return [(cache, row) for row in range(count)]

    @torch.inference_mode()
    def _step(self, group: Group) -> None:
        """One decode step of every row of a batch."""
        rows = group.rows
        if len(rows) > 1:
            for seq in rows:
                seq.request.batched = True
        ids = torch.tensor([[seq.tokens[-1] if not seq.done else self.pad_id] for seq in rows], dtype=torch.long,
                           device=self.device)
        group.mask = torch.cat([group.mask, torch.ones(len(rows), 1, dtype=torch.long, device=self.device)], dim=1)
        positions = (group.mask.cumsum(1) - 1)[:, -1:]
        with self.lock:
            out = self.model(input_ids=ids, attention_mask=group.mask, position_ids=positions,
                             past_key_values=group.cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float().cpu()  # sampled on the host with each sequence's seeded generator
        for row, seq in enumerate(rows):
            if not seq.done:
                job = seq.request.job
                seq.push(int(choose_next(logits[row:row + 1], job.temperature, job.top_p, seq.generator)[0]), self.eos)
        self._retire(group)

    def _retire(self, group: Group) -> None:
        """Drop finished and cancelled rows (their cache share goes with them)."""
        for seq in group.rows:
            if seq.request.cancelled and not seq.done:
                seq.finish("cancelled")
        for row, seq in enumerate(group.rows):
            if seq.done and not seq.retired:
                seq.retire(row_kv(group.cache, row, len(group.rows)))
        live = [row for row, seq in enumerate(group.rows) if not seq.done]
        if not live:
            self.groups.remove(group) if group in self.groups else None
            return
        if len(live) < len(group.rows) and group.joinable and mergeable(group.cache):
            group.cache = repack(self.model, group.policy, [(group.cache, row) for row in live])
            group.rows = [group.rows[row] for row in live]
            group.mask = padding_mask(row_lengths(group.cache), self.device)

    # ---------------------------------------------------------- speculative worker
    def _run_speculative(self) -> None:
        while not self.stopped:
            with self.wake:
                if not self.spec_waiting:
                    self.wake.wait(timeout=0.5)
                    continue
                request = self.spec_waiting.popleft()
            if request.cancelled:
                continue
            self.spec_active = 1
            try:
                self._speculate(request)
            except Cancelled:
                request.sequences[0].finish("cancelled")
                request.sequences[0].retire({})
            except Exception as error:
                request.emit(("error", failure(error)))
            finally:
                self.spec_active = 0

    def _speculate(self, request: Request) -> None:
        from tokensift.speculative import Speculator

        job, seq = request.job, request.sequences[0]
        key = (job.speculate, job.tree_nodes)
        if key not in self.speculators:
            self.speculators[key] = Speculator(self.model, job.speculate, fixed_nodes=job.tree_nodes, packed=self.packed)
        speculator = self.speculators[key]

        def on_token(token: int) -> None:
            if request.cancelled:
                raise Cancelled()
            if seq.done:
                return
            seq.push(token, self.eos)
            if seq.finish_reason == "stop" and token not in self.eos:
                raise Cancelled()  # a stop string: end the run here
            self.lock.release()  # the batch worker may run a step between ours
            time.sleep(0.0005)
            self.lock.acquire()

        cache = make_cache(self.model, job.policy)
        self.metrics.prompt_tokens(len(job.prompt_ids))
        try:
            with self.lock:
                result = speculator.generate(self.tokenizer, job.prompt_ids, policy=job.policy, cache=cache,
                                             max_new_tokens=job.max_tokens, temperature=job.temperature,
                                             top_p=job.top_p, seed=job.seed, stop_at_eos=bool(self.eos),
                                             on_token=on_token)
            accepted = result.accepted_per_step
        except Cancelled:
            if not seq.done:
                raise
            accepted = None
        seq.finish("length")
        seq.retire({**row_kv(cache, 0, 1), **({"accepted_per_step": accepted} if accepted is not None else {})})


def failure(error: Exception) -> str:
    """One line for a request that failed inside the model or the policy."""
    detail = str(error).splitlines()[0] if str(error) else ""
    return f"generation failed: {type(error).__name__}: {detail}"


def policy_key(policy) -> str:
    """Requests batch together only under the same policy with the same parameters."""
    return f"{policy.name}:{sorted((k, str(v)) for k, v in policy.params().items())}"


def eos_ids(model, tokenizer) -> set[int]:
    """Token ids that end a sequence: the tokenizer's EOS and the generation config's."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(int(i) for i in config_eos)
    return ids
