"""``lmforge serve``: an OpenAI-compatible HTTP server with batched decoding and a chat page (``serve/``)."""

from __future__ import annotations

import os
import signal
import sys

from lmforge.cli.use import add_quantize_option


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API, with a chat page at /"
    )
    p.add_argument("model", help="an lmforge run/checkpoint folder or a Hugging Face model folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (the one bound is printed)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    p.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting beyond the batch; more get 429"
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=2048,
        help="prefill work per step: joining requests x longest uncached prompt (the first always joins); "
        "0: one prompt prefilled alone per step",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=256.0,
        help="memory for keys/values of prompt prefixes reused by later prompts (LRU); 0: no prefix cache",
    )
    p.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set LMFORGE_API_KEY)"
    )
    p.add_argument("--max-body-bytes", type=int, default=1_000_000)
    p.add_argument(
        "--grace", type=float, default=10.0, help="seconds running requests get to finish on SIGTERM"
    )
    p.add_argument("--name", default=None, help="the model id clients use (default: the folder's name)")
    p.add_argument(
        "--embedding-pooling",
        choices=("last", "mean"),
        default="last",
        help="/v1/embeddings: the last token's hidden state, or the mean over the tokens (a request's "
        "'pooling' overrides it)",
    )
    p.add_argument("--device", default="auto")
    add_quantize_option(p)


def run_serve(args) -> int:
    from lmforge.serve.app import ServeConfig, open_server
    from lmforge.train.run import pick_device

    cfg = ServeConfig(
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_prefill_tokens=args.max_prefill_tokens,
        prefix_cache_mb=args.prefix_cache_mb,
        api_key=args.api_key if args.api_key is not None else os.environ.get("LMFORGE_API_KEY") or None,
        max_body_bytes=args.max_body_bytes,
        grace_seconds=args.grace,
        model_name=args.name,
        embedding_pooling=args.embedding_pooling,
    )

    def notice(text: str) -> None:
        print(f"lmforge serve: {text}", file=sys.stderr, flush=True)

    server, sock, url = open_server(
        args.model, cfg, device=pick_device(args.device), on_notice=notice, quantize=args.quantize
    )
    print(f"lmforge serve: listening on {url} (chat page: {url}/)", flush=True)
    # uvicorn handles SIGTERM/SIGINT while it runs (drain, then stop) and raises the signal again once it has
    # stopped: that second delivery should end nothing, so the exit is a clean 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run(sockets=[sock])
    print("lmforge serve: stopped", flush=True)
    return 0
