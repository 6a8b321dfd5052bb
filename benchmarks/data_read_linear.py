"""Claim: reading a text file is linear in its size, whatever its layout (issue 27): a file without blank
lines (one sentence per line) is no longer one document searched again after every block.

Setup: for each size (MB), a "paragraph" file (lines of ~80 characters, no blank line: one paragraph) and the
same file read with ``data.split=lines`` (one record per line). Each is read by ``read_documents`` with the
default ``data`` settings (text_chunk_chars 8192, max_chars 10,000,000) in a fresh process, which reports the
seconds, the documents and its peak RSS. Linear: the seconds per MB at every size within a small factor of
those at the smallest size (``vs_smallest`` in each row: 1.0 is exactly linear). Files go to ``--dir`` (put
it on a disk with room: the 1,000 MB size writes 1 GB) and are deleted afterwards unless ``--keep``.
Results: benchmarks/results/data_read_linear.json, with the load average (the machine is shared).
Run: python benchmarks/data_read_linear.py [--sizes 10,100,1000] [--dir /work/tmp-bench/read-linear] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

READ = """
import json, resource, sys, time
from pathlib import Path
from lmforge.config import DataConfig
from lmforge.data.sources import SourceStats, read_documents
cfg, stats = DataConfig(), SourceStats()
started = time.perf_counter()
docs = chars = 0
for doc in read_documents([Path(sys.argv[1])], text_field="text", chunk_chars=cfg.text_chunk_chars, stats=stats,
                          split=sys.argv[2], max_chars=cfg.max_chars):
    docs += 1
    chars += len(doc.text)
seconds = time.perf_counter() - started
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": round(seconds, 3), "docs": docs, "chars": chars, "peak_rss_mb": round(rss, 1),
                  "cut_documents": stats.cut_documents}))
"""


def write_file(path: Path, megabytes: int) -> None:
    line = "One sentence per line, the commonest corpus layout, and no blank line between them at all.\n"
    block = line * (2**20 // len(line))
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(megabytes):
            f.write(block)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--dir", default="/work/tmp-bench/read-linear")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for megabytes in (int(s) for s in args.sizes.split(",")):
        path = folder / f"{megabytes}mb.txt"
        if not path.exists():
            write_file(path, megabytes)
        for split in ("blank", "lines"):
            out = subprocess.run(
                [sys.executable, "-c", READ, str(path), split], capture_output=True, text=True
            )
            if out.returncode:
                raise SystemExit(out.stderr)
            row = {
                "mb": megabytes,
                "layout": "paragraph" if split == "blank" else "lines",
                **json.loads(out.stdout),
            }
            row["mb_per_s"] = round(path.stat().st_size / 1e6 / row["seconds"], 1)
            row["s_per_mb"] = round(row["seconds"] / megabytes, 4)
            first = next(r for r in rows + [row] if r["layout"] == row["layout"])
            row["vs_smallest"] = round(row["s_per_mb"] / first["s_per_mb"], 2)
            row["load_average"] = [round(x, 2) for x in os.getloadavg()]
            rows.append(row)
            print(row, flush=True)
        if not args.keep:
            path.unlink()
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    target = Path(__file__).parent / "results" / "data_read_linear.json"
    machine = f"{os.cpu_count()} CPU cores shared with other jobs"
    target.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
