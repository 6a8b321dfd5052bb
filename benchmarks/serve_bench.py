"""Claim: prefilling the joining requests together and caching the shared prompt prefix cut `lmforge serve`'s
time to first token under load, without slowing decoding: at 3 Poisson request rates, TTFT p50/p99 of the
new scheduler (--max-prefill-tokens 2048, --prefix-cache-mb 256) against the old one (one prompt prefilled
alone per step, no prefix cache: --max-prefill-tokens 0 --prefix-cache-mb 0), same workload, same run.

In the manner of vLLM's `bench serve`: two real servers (`python -m lmforge.cli serve`, subprocesses on
127.0.0.1, port 0, OMP_NUM_THREADS as given to this script, 1 by default) serve one checkpoint, a llama
4 x 256 GQA 4/2 shape, context 1024, random weights, fp32 on the CPU, with an ASCII tokenizer (one token
per character, no byte tokens: every generated token streams as text). The official `openai` client
(AsyncOpenAI, streaming chat completions) sends requests at Poisson arrivals (exponential gaps, seeded:
the same arrival times for every server): each request is a shared system prompt (~490 tokens with the
chat template) and a varied user question (20-120 characters; new questions at each rate), max_tokens 32,
greedy (temperature 0; the random model may end a reply early with end-of-text, the same way on every
server). For each rate the servers run the same workload one after the other, in alternating order. The
prefix cache starts cold (the warm-up uses another system prompt).

Reported per rate and server: completed, failed, duration, request throughput, output tokens/s, TTFT, TPOT
(time per output token after the first) and ITL (gaps between streamed tokens): mean, p50, p99; goodput
(requests/s meeting both SLOs: TTFT <= 1 s and TPOT <= 0.1 s); and from the server's /metrics, prefill
forwards, prefix-cache hits and cached prompt tokens. Then new/old ratios per rate. `--servers
old,batch,new` adds the ablation "batch" (group prefill, no prefix cache) to tell the two changes apart.
`serve_load.py` stays as the closed-loop concurrency claim (N clients back to back); this is the open-loop
one.
Writes benchmarks/results/serve_bench.json (with the machine and the load average before and after).
Run: OMP_NUM_THREADS=1 python benchmarks/serve_bench.py [--rates 1,4,16] [--requests 60] [--quick]
     [--servers old,batch,new] [--out FILE]  (about 6 minutes at load average 4.5 on 2 cores)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

SHAPE = "llama 4 x 256, GQA 4/2, context 1024, fp32, random weights, ASCII tokenizer (no byte fallback)"
SLO_TTFT_S = 1.0
SLO_TPOT_S = 0.1
MAX_TOKENS = 32
SERVERS = {  # name: lmforge serve options
    "old": ("--max-prefill-tokens", "0", "--prefix-cache-mb", "0"),  # one prompt alone per step, no cache
    "batch": ("--max-prefill-tokens", "2048", "--prefix-cache-mb", "0"),  # group prefill only (ablation)
    "new": ("--max-prefill-tokens", "2048", "--prefix-cache-mb", "256"),  # group prefill + prefix cache
}
SYSTEM = (
    "You are the help desk of a small public library. Answer in one or two plain sentences. Opening hours "
    "are nine to six on weekdays and ten to four on Saturdays; the library is closed on Sundays and public "
    "holidays. Members may borrow up to eight books for three weeks and renew them twice unless someone has "
    "reserved them. Late returns cost ten cents a day. The reading room is quiet; group rooms can be booked "
    "at the front desk. Never invent a rule that is not written here."
)
TOPICS = "renew a book, opening hours, late fees, group rooms, borrowing limits, Sunday visits, reservations"


def ascii_tokenizer():
    """One token per printable ASCII character and no byte fallback: every generated token is visible text,
    so each one streams as its own chunk and ITL is per token (with byte tokens, a random model's invalid
    UTF-8 would be held back and arrive in lumps)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    from lmforge.data.tokenizer import SPECIAL_TOKENS, Tokenizer, _special

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for c in [chr(c) for c in range(32, 127)] + ["\n"]:
        vocab[c] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens([_special(t) for t in SPECIAL_TOKENS])
    return Tokenizer(hf)


def make_checkpoint(folder: Path) -> Path:
    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import Config, ModelConfig
    from lmforge.model.transformer import build_model

    tokenizer = ascii_tokenizer()
    tok_file = tokenizer.save(folder / "tok" / "tokenizer.json")
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        max_seq_len=1024,
        n_layers=4,
        d_model=256,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=768,
        tie_embeddings=False,
    )
    model = build_model(cfg, seed=0)
    return save_checkpoint(
        folder / "llama", model_state=model.state_dict(), config=Config(model=cfg), tokenizer_file=tok_file
    )


def workload(n: int, seed: int = 0) -> list[list[dict]]:
    """``n`` chat conversations: the shared system prompt and a varied question of 20-120 characters."""
    rng = random.Random(seed)
    words = (TOPICS.replace(",", "") + " please tell me how when can I the a about my").split()
    out = []
    for _ in range(n):
        length = rng.randint(20, 120)
        text = ""
        while len(text) < length:
            text += rng.choice(words) + " "
        out.append([{"role": "system", "content": SYSTEM}, {"role": "user", "content": text[:length]}])
    return out


def arrival_times(n: int, rate: float, seed: int = 0) -> list[float]:
    """Seconds from the start at which each of ``n`` requests is sent: a Poisson process at ``rate``/s."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


@dataclass
class Result:
    ok: bool
    sent: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    token_times: list[float] = field(default_factory=list)  # arrival of each streamed token, from sending
    error: str | None = None


async def one_request(client, model: str, messages: list[dict], max_tokens: int) -> Result:
    start = time.perf_counter()
    times: list[float] = []
    usage = None
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    times.append(time.perf_counter() - start)
    except Exception as exc:  # a failed request is counted, not fatal
        return Result(ok=False, error=f"{type(exc).__name__}: {exc}"[:200])
    latency = time.perf_counter() - start
    tokens = usage.completion_tokens if usage is not None else len(times)
    return Result(
        ok=True,
        ttft=times[0] if times else latency,
        latency=latency,
        output_tokens=tokens,
        token_times=times,
    )


async def run_load(
    url: str, model: str, conversations: list[list[dict]], arrivals: list[float], max_tokens: int = MAX_TOKENS
) -> tuple[list[Result], float]:
    """Send each conversation at its arrival time (seconds from now); (results, seconds until the last
    answer ended)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    start = time.perf_counter()

    async def at(when: float, messages: list[dict]) -> Result:
        await asyncio.sleep(max(0.0, start + when - time.perf_counter()))
        result = await one_request(client, model, messages, max_tokens)
        result.sent = when
        return result

    try:
        results = await asyncio.gather(*(at(t, m) for t, m in zip(arrivals, conversations)))
    finally:
        await client.close()
    return list(results), time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    """The q-quantile with linear interpolation (numpy's default), as vLLM reports p50/p99."""
    if not values:
        return float("nan")
    values = sorted(values)
    pos = q * (len(values) - 1)
    low = int(pos)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (pos - low)


def stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    return {
        "mean": round(statistics.fmean(values), 4),
        "p50": round(percentile(values, 0.5), 4),
        "p99": round(percentile(values, 0.99), 4),
    }


def summarize(results: list[Result], duration: float, slo_ttft: float, slo_tpot: float) -> dict:
    """vLLM `bench serve`'s figures for one run."""
    ok = [r for r in results if r.ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    good = [
        r
        for r in ok
        if r.ttft <= slo_ttft
        and (r.output_tokens <= 1 or (r.latency - r.ttft) / (r.output_tokens - 1) <= slo_tpot)
    ]
    output = sum(r.output_tokens for r in ok)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": [r.error for r in results if not r.ok][:3],
        "duration_s": round(duration, 2),
        "request_throughput": round(len(ok) / duration, 3),
        "output_tokens": output,
        "output_tokens_per_s": round(output / duration, 1),
        "ttft_s": stats([r.ttft for r in ok]),
        "tpot_s": stats(tpots),
        "itl_s": stats(itls),
        "goodput": round(len(good) / duration, 3),
        "goodput_requests": len(good),
    }


SERIES = (
    "lmforge_prefill_forwards_total",
    "lmforge_prefix_cache_hits_total",
    "lmforge_prefix_cache_misses_total",
    "lmforge_prefix_cache_hit_tokens_total",
    "lmforge_prompt_tokens_total",
)


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=60).text
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in SERIES:
            out[name] = float(value)
    return out


def measured(url: str, model: str, conversations, arrivals, max_tokens: int = MAX_TOKENS) -> dict:
    """One run against the server at ``url``: the figures and what its /metrics counted meanwhile."""
    before = scrape(url)
    results, duration = asyncio.run(run_load(url, model, conversations, arrivals, max_tokens))
    after = scrape(url)
    report = summarize(results, duration, SLO_TTFT_S, SLO_TPOT_S)
    report["server_metrics"] = {
        name.removeprefix("lmforge_").removesuffix("_total"): after.get(name, 0) - before.get(name, 0)
        for name in SERIES
    }
    return report


class Server:
    """``lmforge serve`` in a subprocess on 127.0.0.1 (any free port)."""

    def __init__(self, checkpoint: Path, options: tuple[str, ...]):
        command = [sys.executable, "-m", "lmforge.cli", "serve", str(checkpoint), "--port", "0"]
        command += ["--name", "bench", "--max-batch", "8", "--max-queue", "512", *options]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        )
        assert self.process.stdout is not None
        for line in self.process.stdout:
            found = re.search(r"listening on (http://\S+)", line)
            if found:
                self.url = found.group(1)
                return
        raise RuntimeError(f"the server {' '.join(options)} ended before listening")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", default="1,4,16", help="requests per second, comma-separated")
    parser.add_argument("--requests", type=int, default=60, help="requests per rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke test: 6 requests at 2 rates")
    parser.add_argument(
        "--servers", default="old,new", help=f"which of {', '.join(SERVERS)} to compare (old: the baseline)"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_bench.json"))
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    names = args.servers.split(",")
    if "old" not in names or not set(names) <= set(SERVERS):
        parser.error(f"--servers {args.servers}: names from {', '.join(SERVERS)}, old among them")
    n = args.requests
    if args.quick:
        rates, n = rates[:2], 6
    load_before = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp))
        servers = {name: Server(checkpoint, SERVERS[name]) for name in names}
        try:
            warm_up = [[{"role": "system", "content": "Warm-up."}, {"role": "user", "content": "Hello"}]] * 2
            for (
                server
            ) in servers.values():  # first calls allocate; another system prompt: the cache stays cold
                asyncio.run(run_load(server.url, "bench", warm_up, [0.0, 0.0]))
            for i, rate in enumerate(rates):
                conversations = workload(n, args.seed + 1000 * i)  # new questions at each rate
                arrivals = arrival_times(n, rate, args.seed + i)
                for name in names if i % 2 == 0 else names[::-1]:  # alternating order
                    report = measured(servers[name].url, "bench", conversations, arrivals)
                    report.update(rate=rate, server=name, server_options=" ".join(SERVERS[name]))
                    runs.append(report)
                    print(
                        f"rate {rate}/s {name}: TTFT p50 {report['ttft_s']['p50']} p99 {report['ttft_s']['p99']}"
                        f" TPOT p50 {report['tpot_s']['p50']} p99 {report['tpot_s']['p99']}"
                        f" goodput {report['goodput']} failed {report['failed']} load {os.getloadavg()[0]:.2f}",
                        flush=True,
                    )
        finally:
            for server in servers.values():
                server.close()
    ratios = []
    for rate in rates:
        old = next(r for r in runs if r["rate"] == rate and r["server"] == "old")
        for name in names[1:] if names[0] == "old" else [m for m in names if m != "old"]:
            new = next(r for r in runs if r["rate"] == rate and r["server"] == name)

            def ratio(kind: str, q: str, new=new, old=old) -> float | None:
                a, b = new[kind][q], old[kind][q]
                return round(a / b, 3) if a is not None and b else None

            ratios.append(
                {
                    "rate": rate,
                    "server": name,
                    "ttft_p50_over_old": ratio("ttft_s", "p50"),
                    "ttft_p99_over_old": ratio("ttft_s", "p99"),
                    "tpot_p50_over_old": ratio("tpot_s", "p50"),
                    "tpot_p99_over_old": ratio("tpot_s", "p99"),
                    "goodput_over_old": round(new["goodput"] / old["goodput"], 3) if old["goodput"] else None,
                }
            )
    report = {
        "claim": "group prefill + prefix cache cut TTFT under load without slowing decoding (TPOT)",
        "shape": SHAPE,
        "workload": {
            "requests_per_rate": n,
            "rates": rates,
            "arrivals": "Poisson (exponential gaps), seeded, the same for every server",
            "system_prompt_chars": len(SYSTEM),
            "user_prompt_chars": "20-120, new questions at each rate",
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        },
        "servers": {name: " ".join(SERVERS[name]) for name in names},
        "slo": {"ttft_s": SLO_TTFT_S, "tpot_s": SLO_TPOT_S},
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1"),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "quick": args.quick,
        "runs": runs,
        "ratios": ratios,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
