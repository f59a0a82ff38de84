"""The FastAPI app: OpenAI routes (completions, chat, models), health and metrics, errors as
one-line OpenAI error bodies."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from sse_starlette.sse import EventSourceResponse

from tokensift.serve.metrics import Metrics
from tokensift.serve.protocol import ApiError, ChatRequest, CompletionRequest, ServerDefaults, build_job
from tokensift.serve.scheduler import QueueFull, Request, Scheduler


def error_body(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status_code=status)


def validation_message(error: RequestValidationError) -> str:
    """One line from pydantic's list of errors (malformed JSON included)."""
    first = error.errors()[0] if error.errors() else {}
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON"
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid request")


def create_app(model, tokenizer, model_name: str, defaults: ServerDefaults | None = None,
               max_batch: int = 8, max_queue: int = 128, packed: bool = True, max_groups: int = 2) -> FastAPI:
    """An app serving ``model``; its scheduler threads start and stop with the app's lifespan."""
    defaults = defaults or ServerDefaults()
    defaults.max_n = min(defaults.max_n, max_batch)  # a request's choices must fit the running slots
    metrics = Metrics()
    scheduler = Scheduler(model, tokenizer, metrics, max_batch=max_batch, max_queue=max_queue, packed=packed,
                          max_groups=max_groups)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="tokensift", lifespan=lifespan)
    app.state.scheduler, app.state.metrics = scheduler, metrics

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: HttpRequest, error: RequestValidationError):
        metrics.request(request.url.path, 400)
        return error_body(400, validation_message(error))

    @app.exception_handler(ApiError)
    async def on_api_error(request: HttpRequest, error: ApiError):
        metrics.request(request.url.path, error.status)
        return error_body(error.status, error.message, error.kind)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "running": scheduler.running, "queued": scheduler.queued}

    @app.get("/metrics")
    async def metrics_page():
        return PlainTextResponse(metrics.render(scheduler.running, scheduler.queued), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "tokensift"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        return await serve(body, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HttpRequest):
        return await serve(body, http, chat=True)

    async def serve(body, http: HttpRequest, chat: bool):
        job = build_job(model, tokenizer, body, defaults)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event) -> None:  # from the worker threads
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:
                pass  # the loop is gone: nobody is listening

        request = Request(job, tokenizer, emit, metrics)
        try:
            scheduler.submit(request)
        except QueueFull as full:
            raise ApiError(429, str(full), "rate_limit_error") from None
        metrics.request(http.url.path, 200)
        reply = Reply(chat, model_name, len(job.prompt_ids), job.n)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return EventSourceResponse(stream(request, events, reply, include_usage), ping=15)
        try:
            return await collect(request, events, reply, http)
        finally:
            request.cancel()  # a no-op once finished; frees the slot when the handler is cancelled (Ray Serve, on disconnect)

    async def collect(request: Request, events: asyncio.Queue, reply: "Reply", http: HttpRequest):
        texts, reasons = [""] * request.job.n, [None] * request.job.n
        while True:
            if asyncio.current_task().cancelling():  # Python 3.11's wait_for drops a cancel that lands as an event does
                raise asyncio.CancelledError
            try:
                event = await asyncio.wait_for(events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    request.cancel()
                    return error_body(499, "client disconnected")
                continue
            if event[0] == "delta":
                texts[event[1]] += event[2]
            elif event[0] == "finish":
                reasons[event[1]] = event[2]
            elif event[0] == "error":
                raise ApiError(500, event[1], "server_error")
            elif event[0] == "end":
                return reply.full(texts, reasons, event[1])

    async def stream(request: Request, events: asyncio.Queue, reply: "Reply", include_usage: bool):
        try:
            if reply.chat:
                for index in range(request.job.n):
                    yield json.dumps(reply.chunk(index, role=True))
            while True:
                event = await events.get()
                if event[0] == "delta":
                    yield json.dumps(reply.chunk(event[1], text=event[2]))
                elif event[0] == "finish":
                    reply.finished[event[1]] = event[2]
                elif event[0] == "error":
                    yield json.dumps({"error": {"message": event[1], "type": "server_error", "code": 500}})
                    break
                elif event[0] == "end":
                    for index, reason in enumerate(reply.finished):
                        yield json.dumps(reply.chunk(index, reason=reason, info=event[1]))
                    if include_usage:
                        yield json.dumps({**reply.head(), "choices": [], "usage": reply.usage(event[1])})
                    break
            yield "[DONE]"
        finally:
            request.cancel()  # a no-op once finished; frees the slot when the client went away

    return app


class Reply:
    """Builds OpenAI response bodies and stream chunks for one request."""

    def __init__(self, chat: bool, model_name: str, prompt_tokens: int, n: int):
        self.chat, self.model_name, self.prompt_tokens = chat, model_name, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.finished: list = [None] * n

    def head(self, chunk: bool = True) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name}

    def usage(self, info: dict) -> dict:
        done = info["completion_tokens"]
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done, "total_tokens": self.prompt_tokens + done}

    def chunk(self, index: int, text: str | None = None, role: bool = False, reason=None, info=None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
        body = {**self.head(), "choices": [choice]}
        if info is not None:
            body["tokensift"] = info
        return body

    def full(self, texts: list[str], reasons: list, info: dict) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        return {**self.head(chunk=False), "choices": choices, "usage": self.usage(info), "tokensift": info}
