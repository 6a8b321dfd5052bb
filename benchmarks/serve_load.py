"""Claim: `lmforge serve` batches concurrent requests: 8 clients get >= 3x the aggregate tokens/s of 1 client,
with no errors below the queue bound.

A real server (in this process, on 127.0.0.1, port 0) serves a llama 8 x 512 GQA 8/2 shape with random
weights on the CPU (fp32) and a char tokenizer (so the vocabulary is the tokenizer's, a few hundred ids).
For each client count (1, 4, 8) the same fixed list of requests (mixed prompt lengths 8..160 characters,
max_tokens 32..128, greedy) is sent by that many concurrent streaming clients. Reported per client count:
requests/s, generated tokens/s, p50/p95 latency and time to first token, errors, and the ratio of aggregate
tokens/s at 8 clients over 1 client. Greedy decoding makes each request's tokens the same at every client
count (the batching tests prove it), so the levels do the same work. (Measured when one joining prompt was
prefilled per step; the server now prefills joining prompts together. This closed-loop claim, N clients back
to back, stays here; `serve_bench.py` is the open-loop one: Poisson arrivals at set rates, TTFT/TPOT
percentiles and goodput, the old and new scheduler compared in one run.)
Writes benchmarks/results/serve_load.json.
Run: python benchmarks/serve_load.py [--requests N] [--clients 1,4,8] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.config import Config, ModelConfig
from lmforge.data.tokenizer import char_tokenizer
from lmforge.model.transformer import build_model
from lmforge.serve.app import ServeConfig, open_server

SHAPE = "llama 8 x 512, GQA 8/2, context 512"


def make_checkpoint(folder: Path) -> Path:
    tokenizer = char_tokenizer([chr(c) for c in range(32, 127)] + ["\n"])
    tok_file = tokenizer.save(folder / "tok" / "tokenizer.json")
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        max_seq_len=512,
        n_layers=8,
        d_model=512,
        n_heads=8,
        n_kv_heads=2,
        ffn_hidden=1536,
        tie_embeddings=False,
    )
    model = build_model(cfg, seed=0)
    return save_checkpoint(
        folder / "llama", model_state=model.state_dict(), config=Config(model=cfg), tokenizer_file=tok_file
    )


PROMPT_CHARS = (8, 32, 96, 160)
MAX_TOKENS = (32, 64, 96, 128)


def workload(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "the model reads a prompt and writes tokens one at a time while others wait".split()
    out = []
    for _ in range(n):
        length = rng.choice(PROMPT_CHARS)
        text = ""
        while len(text) < length:
            text += rng.choice(words) + " "
        out.append(
            {
                "prompt": text[:length],
                "max_tokens": rng.choice(MAX_TOKENS),
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
    return out


def one_request(client: httpx.Client, url: str, body: dict) -> dict:
    start = time.perf_counter()
    first = None
    tokens = 0
    with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            return {"error": f"{response.status_code}: {response.text[:200]}"}
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
    latency = time.perf_counter() - start
    return {"latency": latency, "ttft": first if first is not None else latency, "tokens": tokens}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def run_level(url: str, requests: list[dict], clients: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    todo = list(enumerate(requests))

    def client_loop():
        with httpx.Client(timeout=600) as client:
            while True:
                with lock:
                    if not todo:
                        return
                    _, body = todo.pop(0)
                result = one_request(client, url, body)
                with lock:
                    results.append(result)

    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_examples": [r["error"] for r in results if "error" in r][:3],
        "seconds": round(elapsed, 2),
        "requests_per_s": round(len(ok) / elapsed, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / elapsed, 1),
        "latency_p50_s": round(percentile([r["latency"] for r in ok], 0.5), 3),
        "latency_p95_s": round(percentile([r["latency"] for r in ok], 0.95), 3),
        "ttft_p50_s": round(percentile([r["ttft"] for r in ok], 0.5), 3),
        "ttft_p95_s": round(percentile([r["ttft"] for r in ok], 0.95), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    levels = [int(c) for c in args.clients.split(",")]
    requests = workload(args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp))
        cfg = ServeConfig(port=0, max_batch=max(levels), max_queue=4 * max(levels), model_name="llama")
        server, sock, url = open_server(checkpoint, cfg, device=torch.device(args.device))
        server.config.log_level = "warning"
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        run_level(url, requests[:4], 1)  # warm-up
        results = [run_level(url, requests, c) for c in levels]
        server.should_exit = True
        thread.join(timeout=60)
    by_clients = {r["clients"]: r for r in results}
    ratio = None
    if 1 in by_clients and 8 in by_clients:
        ratio = round(by_clients[8]["tokens_per_s"] / by_clients[1]["tokens_per_s"], 2)
    report = {
        "claim": "8 concurrent clients get >= 3x the aggregate tokens/s of 1 client; "
        "0 errors below the queue bound",
        "shape": SHAPE,
        "device": args.device,
        "workload": {"requests": args.requests, "prompt_chars": PROMPT_CHARS, "max_tokens": MAX_TOKENS},
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "levels": results,
        "tokens_per_s_8_over_1": ratio,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
