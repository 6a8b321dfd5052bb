"""Claim (issue 27, item 2): a tokenizer worker's memory is bounded whatever one document's size. One 10 MB
document took a worker to 1.9 GB RSS when encoded whole; ``DocumentEncoder`` now encodes a long document in
pieces of ~64K characters cut where the tokenizer splits anyway, with the very same ids.

Setup: one document of ``--mb`` MB of English (../shared/data books, concatenated and repeated; its line
breaks kept), a byte-level BPE of 2,000 tokens trained on its first 300K characters, and
``DocumentEncoder([document])`` in a fresh process per configuration: engine (``tokenizers``; ``tiktoken``,
whose first document is also checked against ``tokenizers``) x (whole: ``piece_chars=0``, the behaviour
before; pieces: the default). Each process reports the seconds, its peak RSS (VmHWM) and a hash of the ids;
the pieces' ids must equal the whole document's.

    python benchmarks/data_long_document.py [--mb 10] [--dir /work/tmp-bench/long-document]

Writes benchmarks/results/data_long_document.json with the load average (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"

ENCODE = """
import hashlib, json, sys, time
import numpy as np
from lmforge.data.shards import DocumentEncoder

def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

text = open(sys.argv[1], encoding="utf-8").read()
encoder = DocumentEncoder(sys.argv[2], use_tiktoken=sys.argv[3] == "tiktoken", piece_chars=int(sys.argv[4]))
before = hwm_mb()
started = time.perf_counter()
[ids] = encoder([text])
seconds = time.perf_counter() - started
print(json.dumps({"seconds": round(seconds, 2), "tokens": int(len(ids)), "rss_before_mb": round(before, 1),
                  "peak_rss_mb": round(hwm_mb(), 1), "ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest()[:16],
                  "engine": "tiktoken" if encoder.fast is not None else "tokenizers"}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=10)
    parser.add_argument("--dir", default="/work/tmp-bench/long-document")
    args = parser.parse_args()
    from lmforge.data.shards import PIECE_CHARS
    from lmforge.data.tokenizer import train_bpe

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    books = "".join(p.read_text(encoding="utf-8-sig") for p in sorted((SHARED / "en").glob("*.txt")))
    size = args.mb * 1_000_000
    document = (books * (size // len(books) + 1))[:size]
    (folder / "doc.txt").write_text(document, encoding="utf-8")
    train_bpe([document[:300_000]], 2000).save(folder / "tokenizer.json")
    rows = []
    for engine in ("tokenizers", "tiktoken"):
        for mode, piece_chars in (("whole", 0), ("pieces", PIECE_CHARS)):
            argv = [str(folder / "doc.txt"), str(folder / "tokenizer.json"), engine, str(piece_chars)]
            out = subprocess.run([sys.executable, "-c", ENCODE, *argv], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr)
            row = {"requested": engine, "mode": mode, "piece_chars": piece_chars, **json.loads(out.stdout)}
            row["load_average"] = [round(x, 2) for x in os.getloadavg()]
            rows.append(row)
            print(row, flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    same = {r["ids_sha256"] for r in rows}
    record = {
        "document_chars": size,
        "machine": f"{os.cpu_count()} CPU cores shared with other jobs",
        "same_ids_everywhere": len(same) == 1,
        "rows": rows,
    }
    target = ROOT / "benchmarks" / "results" / "data_long_document.json"
    target.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in record.items() if k != "rows"}))


if __name__ == "__main__":
    main()
