"""The OpenAI request bodies the server accepts (plus tokensift's own fields) and how a request
becomes a job: prompt ids, sampling settings, the policy and the drafter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict

from tokensift.errors import TokensiftError
from tokensift.generate import model_context_length


class ApiError(Exception):
    """An HTTP error with a one-line message (OpenAI's error body)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class TokensiftFields(BaseModel):
    """What a client may add with ``extra_body``: the policy and the drafter, per request."""

    model_config = ConfigDict(extra="ignore")

    policy: Optional[str] = None
    budget: Optional[int] = None
    ratio: Optional[float] = None
    policy_params: Optional[dict[str, Any]] = None
    speculate: Optional[Union[str, bool]] = None
    tree_nodes: Optional[int] = None


class SamplingFields(TokensiftFields):
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[int], list[str]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage]


@dataclass
class ServerDefaults:
    """The server's flags: what a request gets when it does not say."""

    policy: str = "full"
    budget: Optional[int] = None
    ratio: Optional[float] = None
    policy_params: dict = field(default_factory=dict)
    speculate: Optional[str] = None
    max_tokens: int = 64
    max_n: int = 8


@dataclass
class Job:
    """A validated request, ready for the scheduler."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    n: int
    policy: Any
    policy_spec: str
    speculate: Optional[str]
    tree_nodes: Optional[int]


def prompt_ids(tokenizer, body: CompletionRequest | ChatRequest) -> list[int]:
    """Token ids of the prompt (chat template applied for chat requests)."""
    if isinstance(body, ChatRequest):
        if not body.messages:
            raise ApiError(400, "messages must not be empty")
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template: use /v1/completions")
        messages = [{"role": m.role, "content": message_text(m.content)} for m in body.messages]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ApiError(400, "send one prompt per request (a list of several prompts is not supported)")
        prompt = prompt[0]
    ids = list(tokenizer(prompt)["input_ids"]) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ApiError(400, "the prompt is empty")
    return ids


def message_text(content) -> str:
    """A message's text: a string, or the text parts of a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = [part.get("text", "") for part in content if part.get("type") == "text"]
    if len(parts) != len(content):
        raise ApiError(400, "only text message parts are supported")
    return "".join(parts)


def build_job(model, tokenizer, body: CompletionRequest | ChatRequest, defaults: ServerDefaults) -> Job:
    """Validate a request into a :class:`Job` (ApiError 400 with one line on bad input)."""
    from tokensift.policies import build_policy

    ids = prompt_ids(tokenizer, body)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise ApiError(400, f"prompt token ids must be in [0, {vocab})")
    max_tokens = body.max_completion_tokens or body.max_tokens or defaults.max_tokens
    if max_tokens < 1:
        raise ApiError(400, f"max_tokens must be >= 1 (got {max_tokens})")
    limit = model_context_length(model)
    if limit and len(ids) + max_tokens > limit:
        raise ApiError(400, f"prompt of {len(ids)} tokens + max_tokens {max_tokens} exceeds the model's context of {limit} tokens")
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if not 0.0 <= temperature <= 2.0:
        raise ApiError(400, f"temperature must be in [0, 2] (got {temperature})")
    if not 0.0 < top_p <= 1.0:
        raise ApiError(400, f"top_p must be in (0, 1] (got {top_p})")
    if not 1 <= body.n <= defaults.max_n:
        raise ApiError(400, f"n must be between 1 and {defaults.max_n} (got {body.n})")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise ApiError(400, "at most 4 stop strings")
    spec, policy = policy_choice(body, defaults)
    try:
        policy = build_policy(spec, **policy)
    except TokensiftError as error:
        raise ApiError(400, str(error)) from None
    speculate = speculate_choice(body.speculate, defaults.speculate)
    if speculate is not None and body.n != 1:
        raise ApiError(400, "n > 1 is not supported with speculate")
    if body.tree_nodes is not None and body.tree_nodes < 0:
        raise ApiError(400, f"tree_nodes must be >= 0 (got {body.tree_nodes})")
    return Job(ids, max_tokens, temperature, top_p, 0 if body.seed is None else body.seed, stop, body.n,
               policy, spec, speculate, body.tree_nodes)


def policy_choice(body: TokensiftFields, defaults: ServerDefaults) -> tuple[str, dict]:
    """A request that names a policy brings its own budget and parameters; one that does not
    gets the server's policy, with any budget/ratio/parameters it gives on top."""
    given = {"budget": body.budget, "ratio": body.ratio}
    if body.budget is not None and body.budget < 1:
        raise ApiError(400, f"budget must be a positive number of tokens (got {body.budget})")
    if body.budget is not None and body.ratio is not None:
        raise ApiError(400, "give budget or ratio, not both")
    if body.policy:
        return body.policy, {**given, **(body.policy_params or {})}
    base = {"budget": defaults.budget, "ratio": defaults.ratio, **defaults.policy_params}
    if body.budget is not None or body.ratio is not None:
        base.update(given)
    return defaults.policy, {**base, **(body.policy_params or {})}


def speculate_choice(value, default: Optional[str]) -> Optional[str]:
    """The drafter to use: the request's (False/"none" turns it off), else the server's."""
    from tokensift.speculative import DRAFTER_NAMES

    if value is None:
        return default
    if value is False or value in ("none", "off", ""):
        return None
    if value is True:
        return "auto"
    if value not in DRAFTER_NAMES:
        raise ApiError(400, f"unknown drafter '{value}'; use one of: {', '.join(DRAFTER_NAMES)}")
    return value
