"""Prometheus-style counters and gauges of the server, in the text exposition format."""

from __future__ import annotations

import collections
import threading
import time


class Metrics:
    """Requests by endpoint and status, tokens, tokens/s over the last 10 s, KV bytes held."""

    WINDOW = 10.0

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()
        self.generated = 0
        self.prompt = 0
        self.kv_held = 0
        self._recent: collections.deque[float] = collections.deque()

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def token(self) -> None:
        now = time.monotonic()
        with self._lock:
            self.generated += 1
            self._recent.append(now)

    def prompt_tokens(self, count: int) -> None:
        with self._lock:
            self.prompt += count

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0] < now - self.WINDOW:
                self._recent.popleft()
            return len(self._recent) / self.WINDOW

    def render(self, running: int, queued: int) -> str:
        """The metrics page."""
        lines = [
            "# HELP tokensift_requests_total Requests by endpoint and HTTP status.",
            "# TYPE tokensift_requests_total counter",
        ]
        with self._lock:
            for (endpoint, status), count in sorted(self.requests.items()):
                lines.append(f'tokensift_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}')
            generated, prompt, held = self.generated, self.prompt, self.kv_held
        gauges = [
            ("tokensift_generated_tokens_total", "counter", "Tokens generated.", generated),
            ("tokensift_prompt_tokens_total", "counter", "Prompt tokens prefilled.", prompt),
            ("tokensift_tokens_per_second", "gauge", f"Tokens generated per second over the last {self.WINDOW:.0f} s.",
             round(self.tokens_per_second(), 3)),
            ("tokensift_running_sequences", "gauge", "Sequences decoding now.", running),
            ("tokensift_queue_depth", "gauge", "Requests waiting for a slot.", queued),
            ("tokensift_kv_bytes_held", "gauge", "Bytes of K/V held by the running batches.", held),
        ]
        for name, kind, help_text, value in gauges:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"
