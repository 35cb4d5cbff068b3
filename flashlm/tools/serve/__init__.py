"""`flashlm serve`: an OpenAI-compatible HTTP server for one loaded model (Starlette on uvicorn).

    /v1/chat/completions, /v1/completions (SSE streaming with "stream": true), /v1/models, /health

protocol.py is the wire format (requests checked into GenerationOptions, responses, errors); app.py the routes,
the slots and the queue. Starlette rather than FastAPI: the requests are checked by hand against OpenAI's field
list (so errors name the field in OpenAI's error shape), which leaves nothing for FastAPI's pydantic layer to do.
"""

from __future__ import annotations

import os
import socket
import sys

import numpy as np
import uvicorn

from flashlm.flash_store.planner import KV_DTYPE
from flashlm.flash_store.reader import is_flash_store
from flashlm.models import read_model
from flashlm.options import LoadOptions
from flashlm.tools.serve.app import Server, create_app


def model_id(path: str, alias: str | None) -> str:
    """What /v1/models lists: the alias, else the file name without its extension."""
    return alias or os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def slot_kv_bytes(path: str, options: LoadOptions) -> int:
    """Host memory of one full-context session's KV cache on this model, as the loader makes it: what each
    --parallel slot beyond the first adds to a --memory-budget plan (which counts one). 0 on the GPU."""
    if options.device == "cuda":
        return 0
    f, _, args = read_model(path)
    try:
        dtype = KV_DTYPE if is_flash_store(f) else np.float32  # runtime/flash_loader.py, runtime/model_loader.py
        n_ctx = options.resolved_ctx(args.n_ctx_train)
    finally:
        f.close()
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * np.dtype(dtype).itemsize * n_ctx


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket (OSError when the address is taken or cannot be bound)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def run_server(model, sock: socket.socket, name: str, defaults, parallel: int, queue: int,
               api_key: str | None) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's graceful shutdown: running requests get a few seconds to end)."""
    app = create_app(Server(model, name, defaults, parallel, queue, api_key))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    kv_mb = model.engine.kv.bytes_per_token() * model.n_ctx / 1e6
    print(f"flashlm serve: {name} on http://{shown}:{port}/v1 ({parallel} slot(s) of {model.n_ctx} tokens, "
          f"KV cache up to {kv_mb:.0f} MB each; queue {queue})", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])
