"""The unit of the benchmark: one prompt, already tokenized, with its gold answers."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokensift.errors import TokensiftError

QUERY_AGNOSTIC = "query_agnostic"
QUERY_AWARE = "query_aware"
PROTOCOLS = (QUERY_AGNOSTIC, QUERY_AWARE)


@dataclass
class TaskInstance:
    """One benchmark prompt as token ids, so every library sees the same tokens.

    ``context_ids`` is the part that is prefilled (and compressed); ``suffix_ids`` is appended
    afterwards, then ``max_new_tokens`` are greedy-decoded. In the query-agnostic protocol the
    question lives in ``suffix_ids``; in the query-aware one it is the tail of ``context_ids``.
    """

    task: str
    protocol: str
    length: int
    index: int
    seed: int
    context_ids: list[int]
    suffix_ids: list[int]
    answers: list[str]
    max_new_tokens: int
    meta: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """A stable name for this instance: task/protocol/length/seed/index."""
        return f"{self.task}/{self.protocol}/{self.length}/{self.seed}/{self.index}"

    @property
    def total_tokens(self) -> int:
        """Prompt tokens plus the tokens generation may add."""
        return len(self.context_ids) + len(self.suffix_ids) + self.max_new_tokens

    def to_json(self) -> str:
        """One jsonl line."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> "TaskInstance":
        """Parse one jsonl line written by :meth:`to_json`."""
        try:
            return cls(**json.loads(line))
        except (TypeError, ValueError) as error:
            raise TokensiftError(f"not a task instance line: {error}") from None


def write_jsonl(instances: list[TaskInstance], path: str | Path) -> Path:
    """Write instances to a jsonl file, one per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(instance.to_json() + "\n" for instance in instances))
    return path


def read_jsonl(path: str | Path) -> list[TaskInstance]:
    """Read instances written by :func:`write_jsonl`."""
    path = Path(path)
    if not path.is_file():
        raise TokensiftError(f"instances file not found: {path}")
    lines = path.read_text().splitlines()
    return [TaskInstance.from_json(line) for line in lines if line.strip()]


def check_protocol(protocol: str) -> str:
    """Return the protocol name or raise a one-line error."""
    if protocol not in PROTOCOLS:
        raise TokensiftError(f"unknown protocol {protocol!r}; use one of: {', '.join(PROTOCOLS)}")
    return protocol
