"""The ASGI application of `flashlm serve` (Starlette): routes, slots and the queue, streaming.

Concurrency: one loaded Model, `parallel` Sessions (model.session(): a KV cache each on the shared weights). A
request takes a free session, the one whose cached tokens share the longest prefix with its prompt (as
llama-server picks a slot), so a conversation's next turn reuses its cache; with none free it waits in a FIFO queue
of at most `queue` places, and beyond that it is refused at once with 429. Forward passes are serialized per model
(runtime/executor.py: Engine.lock), so sessions interleave token by token: more slots share the compute, they do
not add to it. Generation is synchronous: each request's runs in a thread of its own (Generation), so the event
loop keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from flashlm.errors import (
    ChatTemplateError,
    ContextLengthError,
    FlashLMError,
    InvalidOptionError,
)
from flashlm.options import GenerationOptions
from flashlm.runtime.executor import common_prefix
from flashlm.runtime.generate import GenerationResponse, check_prompt
from flashlm.tools.serve.protocol import (
    APIError,
    CompletionRequest,
    chunk,
    completion,
    new_id,
    parse_request,
    usage,
    usage_chunk,
)

log = logging.getLogger("flashlm.serve")
DISCONNECT_CHECK_STEPS = 8  # a non-streaming request looks for a gone client every this many tokens


class SlotPool:
    """The sessions requests run on, and the FIFO queue in front of them (module docstring). Used from the event
    loop's thread only (a generation thread releases through loop.call_soon_threadsafe)."""

    def __init__(self, sessions: list, queue: int):
        self.sessions, self.free, self.queue = list(sessions), list(sessions), queue
        self.waiters: deque[asyncio.Future] = deque()

    async def acquire(self, ids: list[int]):
        if self.free and not self.waiters:  # nobody overtakes a waiting request
            best = max(self.free, key=lambda s: common_prefix(s.engine.tokens, ids))
            self.free.remove(best)
            return best
        if len(self.waiters) >= self.queue:
            raise APIError(429, f"the server is busy: {len(self.sessions)} requests running and {len(self.waiters)} "
                           "waiting (--parallel, --queue); retry later", type="server_busy",
                           code="rate_limit_exceeded")
        handed = asyncio.get_running_loop().create_future()
        self.waiters.append(handed)
        try:
            return await handed
        except asyncio.CancelledError:
            if handed.done() and not handed.cancelled():  # a session was handed over as the wait was cancelled
                self.release(handed.result())
            else:
                self.waiters.remove(handed)
            raise

    def release(self, session) -> None:
        """The session goes to the first waiting request, else back to the free ones."""
        while self.waiters:
            handed = self.waiters.popleft()
            if not handed.done():
                handed.set_result(session)
                return
        self.free.append(session)

    def stats(self) -> dict:
        return {"slots_idle": len(self.free), "slots_processing": len(self.sessions) - len(self.free),
                "requests_waiting": len(self.waiters)}


_END = object()


class Generation:
    """One request's steps, run in a thread of its own that hands each response to the event loop: the compute
    never waits for the loop between tokens (a worker-thread hop per token cost ~40% of decode speed on the
    kernel executor, measured on a busy 2-core machine). cancel() makes the thread stop after its current step; the
    thread closes the stream itself (never while inside it) and then calls on_end (the slot's release)."""

    def __init__(self, steps: Iterator[GenerationResponse], on_end):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._stop = threading.Event()
        self._steps, self._on_end = steps, on_end
        threading.Thread(target=self._run, name="flashlm-serve-generation", daemon=True).start()

    def _run(self) -> None:
        put = self._queue.put_nowait
        try:
            for r in self._steps:
                self._call(put, r)
                if self._stop.is_set():
                    break
        except BaseException as e:  # noqa: BLE001 - handed to the request, which answers with it
            self._call(put, e)
        finally:
            self._steps.close()
            self._call(self._end)

    def _end(self) -> None:
        # one loop callback: the slot is free before the request sees _END and answers (two callbacks let the loop
        # send the answer between them, and a /health right after it found the slot still busy)
        self._on_end()
        self._queue.put_nowait(_END)

    def _call(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server has stopped, nobody is waiting
            pass

    async def next(self) -> GenerationResponse | None:
        """The next response; None at the end; an exception raised by the generation is raised here."""
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # stays ended
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self._stop.set()


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class _EventStream(StreamingResponse):
    """An SSE response that releases its slot however it ends: done, client gone, error, or never started."""

    def __init__(self, body, cleanup):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._body, self._cleanup = body, cleanup

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):  # the client went away (ASGI 2.4: a failed send)
            pass
        finally:
            await self._body.aclose()
            self._cleanup()
            if not scope.get("flashlm.sent_all"):  # stopped before [DONE] was sent: the client went away
                scope["flashlm.log"] = scope.get("flashlm.log", "") + " (client disconnected)"


class Server:
    def __init__(self, model, model_id: str, defaults: GenerationOptions, parallel: int, queue: int,
                 api_key: str | None = None):
        self.model, self.model_id, self.defaults, self.api_key = model, model_id, defaults, api_key
        self.slots = SlotPool([model.session() for _ in range(parallel)], queue)
        self.created = int(time.time())

    # -- routes ------------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", **self.slots.stats()})

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def retrieve_model(self, request: Request) -> Response:
        self._authorize(request)
        if request.path_params["name"] != self.model_id:
            raise APIError(404, f"the model {request.path_params['name']!r} does not exist (this server has "
                           f"{self.model_id!r})", param="model", code="model_not_found")
        return JSONResponse(self._model_card())

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    def _model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "flashlm",
                "context_length": self.model.n_ctx}

    def _authorize(self, request: Request) -> None:
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")

    # -- completions -------------------------------------------------------------------------------------
    async def _complete(self, request: Request, chat: bool) -> Response:
        self._authorize(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        req = parse_request(body, chat, self.defaults)
        ids = await anyio.to_thread.run_sync(self._prompt_ids, req, None)
        session = await self.slots.acquire(ids)
        try:
            if chat and req.options.ctx_overflow == "shift":  # the session drops old turns as it keeps them
                ids = await anyio.to_thread.run_sync(self._prompt_ids, req, session)
            gen = Generation(session.stream(ids, req.options), lambda: self.slots.release(session))
        except BaseException:
            self.slots.release(session)
            raise
        rid = new_id(chat)
        if req.stream:
            return _EventStream(self._events(request, req, rid, len(ids), gen), gen.cancel)
        try:
            return await self._collect(request, req, rid, len(ids), gen)
        finally:
            gen.cancel()  # a request cut short frees its slot after the step under way

    def _prompt_ids(self, req: CompletionRequest, session) -> list[int]:
        """Tokenized prompt (runs in a worker thread); APIError 400 when it is empty or does not fit the context."""
        m, param = self.model, "messages" if req.chat else "prompt"
        try:
            if isinstance(req.prompt, str):
                ids = m.tokenize(req.prompt)
            elif not req.chat:  # token ids
                ids = req.prompt
                if not all(0 <= i < m.args.vocab_size for i in ids):
                    raise APIError(400, f"prompt: token ids must be in 0..{m.args.vocab_size - 1}", param="prompt",
                                   code="invalid_value")
            elif session is not None:
                ids = session.chat_prompt_ids(req.messages, req.options)
            else:
                ids = m.chat_prompt_ids(req.messages)
                if req.options.ctx_overflow == "shift":
                    return ids  # the session trims it to fit
            check_prompt(len(ids), m.n_ctx)
            return ids
        except ContextLengthError as e:
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
        except (ChatTemplateError, InvalidOptionError) as e:
            raise APIError(400, str(e), param=param) from None

    async def _collect(self, request: Request, req: CompletionRequest, rid: str, n_prompt: int,
                       gen: Generation) -> Response:
        text, last, n = [], None, 0
        while (r := await gen.next()) is not None:
            text.append(r.text)
            last, n = r, n + 1
            if n % DISCONNECT_CHECK_STEPS == 0 and await request.is_disconnected():
                request.scope["flashlm.log"] = " (client disconnected)"
                return Response(status_code=499)
        use = self._usage(request, n_prompt, last)
        return JSONResponse(completion(req, rid, self.model_id, "".join(text), last.finish_reason, use))

    async def _events(self, request: Request, req: CompletionRequest, rid: str, n_prompt: int, gen: Generation):
        created, last = int(time.time()), None
        if req.chat:
            yield _sse(chunk(req, rid, self.model_id, created, None, role=True))
        try:
            while (r := await gen.next()) is not None:
                last = r
                if r.finish_reason is None:
                    if r.text:
                        yield _sse(chunk(req, rid, self.model_id, created, r.text))
                    continue
                if r.text:
                    yield _sse(chunk(req, rid, self.model_id, created, r.text))
                yield _sse(chunk(req, rid, self.model_id, created, None, r.finish_reason))
        except FlashLMError as e:  # e.g. storage failing under the model: the headers are sent, say it in-stream
            log.error(f"flashlm serve: {rid}: {e}")
            yield _sse(APIError(500, str(e), type="server_error").body())
        use = self._usage(request, n_prompt, last)
        if req.include_usage and last is not None:
            yield _sse(usage_chunk(req, rid, self.model_id, created, use))
        yield b"data: [DONE]\n\n"
        request.scope["flashlm.sent_all"] = True  # reached when the stream asks past [DONE]: it was sent

    def _usage(self, request: Request, n_prompt: int, last: GenerationResponse | None) -> dict:
        t = last.timings if last is not None else None
        n_gen = t.eval_tokens if t else 0
        if t is not None:
            request.scope["flashlm.log"] = (
                f" prompt {n_prompt} tok ({t.cached_tokens} cached, {t.prompt_ms:.0f} ms), {n_gen} tok at "
                f"{t.eval_tps:.1f} tok/s, finish {last.finish_reason}")
        return usage(n_prompt, n_gen, t.cached_tokens if t else 0)


# -- errors and the request log ------------------------------------------------------------------------------
async def _api_error(request: Request, exc: APIError) -> Response:
    headers = {"Retry-After": "1"} if exc.status == 429 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = "not_found" if exc.status_code == 404 else None
    return JSONResponse(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                 code=kind).body(), status_code=exc.status_code)


async def _server_error(request: Request, exc: Exception) -> Response:
    # ServerErrorMiddleware logs the traceback; the client gets OpenAI's shape
    return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body(),
                        status_code=500)


class RequestLog:
    """One line per request on stderr: client, method and path, status, seconds, and for completions the tokens."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            client = f"{scope['client'][0]}:{scope['client'][1]}" if scope.get("client") else "-"
            print(f"flashlm serve: {client} {scope['method']} {scope['path']} {status[0]} "
                  f"{time.perf_counter() - t0:.2f} s{scope.get('flashlm.log', '')}", file=sys.stderr, flush=True)


def create_app(server: Server) -> Starlette:
    from starlette.middleware import Middleware

    routes = [
        Route("/health", server.health, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{name:path}", server.retrieve_model, methods=["GET"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
    ]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _server_error}
    return Starlette(routes=routes, middleware=[Middleware(RequestLog)], exception_handlers=handlers)
