"""The partitioned job (``data/partitioned.py``'s stages) driven through an executor: which units run, in
what order, with progress on screen and in ``work/status.json`` (``status-task{i}.json`` for array tasks), and the ``job.json`` summary."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from lmforge.config import DataConfig
from lmforge.data.clean import empty_message
from lmforge.data.executors import InlineExecutor, make_executor
from lmforge.data.partitioned import (
    PLAN,
    decide,
    exact_partition,
    finish,
    iter_texts,
    load_plan,
    make_plan,
    map_file,
    marker,
    merged_report,
    near_partition,
    tokenize_partition,
)
from lmforge.data.shards import TIKTOKEN_SAMPLE_CHARS, choose_encoder, dtype_for, read_json, write_json
from lmforge.data.tokenizer import iter_sample, load_tokenizer, train_tokenizer
from lmforge.errors import DataError

STAGE_UNITS = {
    "map": map_file,
    "exact": exact_partition,
    "near": near_partition,
    "tokenize": tokenize_partition,
}


def run_unit(stage: str, work: str, unit: int) -> dict:
    """One unit of one stage: what every executor calls (a module-level function, so it pickles by name)."""
    return STAGE_UNITS[stage](Path(work), unit)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
    """Array task ``index`` of ``count``: it runs the ``map`` units ``f`` with ``f % count == index``."""

    index: int
    count: int


def run_stage(
    executor,
    work: Path,
    stage: str,
    units: list[int],
    *,
    progress: bool,
    seconds: dict,
    status: str = "status.json",
    sizes: list[int] | None = None,
) -> None:
    """Run the units of ``stage`` that have no marker yet, showing and saving (``status.json``) documents,
    bytes, throughput and the ETA (from the input bytes left when ``sizes`` gives each unit's, else from the
    units left)."""
    from tqdm import tqdm

    pending = [u for u in units if not marker(work, stage, u).exists()]
    if not pending:
        return
    started = time.perf_counter()
    docs = nbytes = 0
    left = sum(sizes[u] for u in pending) if sizes else None
    with tqdm(
        total=len(units), initial=len(units) - len(pending), desc=stage, unit="unit", disable=not progress
    ) as bar:
        for n, result in enumerate(executor.map(run_unit, stage, str(work), pending), 1):
            docs += result.get("docs", result.get("docs_in", 0))
            nbytes += result.get("bytes", 0)
            elapsed = time.perf_counter() - started
            if left is not None:
                left -= sizes[result["unit"]]
                eta = elapsed / max(1, sum(sizes[u] for u in pending) - left) * left
            else:
                eta = elapsed / n * (len(pending) - n)
            bar.set_postfix(docs=docs, MB=round(nbytes / 1e6, 1), MBps=round(nbytes / 1e6 / elapsed, 2))
            bar.update(1)
            state = {
                "stage": stage,
                "units_done": len(units) - len(pending) + n,
                "units": len(units),
                "docs": docs,
                "bytes": nbytes,
                "seconds": round(elapsed, 3),
                "docs_per_s": round(docs / elapsed, 1),
                "mb_per_s": round(nbytes / 1e6 / elapsed, 3),
                "eta_s": round(eta, 1),
            }
            write_json(work / status, state)
    seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - started
    seconds[f"{stage}.units_run"] = seconds.get(f"{stage}.units_run", 0) + len(pending)


def prepare_partitioned(
    cfg: DataConfig, paths: list[Path], out: Path, *, wanted, progress: bool, strict: bool, task: Task | None
) -> dict:
    """Run (or continue) the partitioned job in ``out/work``. For an array task: its ``map`` units only,
    returning their counts. Otherwise the whole job, returning the tokenizer, encoder, splits and report;
    the caller writes ``meta.json`` and removes ``work``."""
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    if not (work / PLAN).exists():
        write_json(work / PLAN, make_plan(cfg, paths, strict=strict))
    plan = load_plan(work)
    files = list(range(len(plan["files"])))
    seconds: dict[str, float] = {}
    if task is not None:
        mine = [f for f in files if f % task.count == task.index]
        status = f"status-task{task.index}.json"  # one per task: they run at the same time
        run_stage(
            InlineExecutor(),
            work,
            "map",
            mine,
            progress=progress,
            seconds=seconds,
            status=status,
            sizes=plan["bytes"],
        )
        done = [read_json(marker(work, "map", f)) for f in mine]
        return {
            "task": task.index,
            "tasks": task.count,
            "files": len(mine),
            "docs": sum(d["docs"] for d in done),
            "bytes": sum(d["bytes"] for d in done),
            "seconds": round(seconds.get("map", 0.0), 3),
        }
    executor = make_executor(cfg.executor, cfg.workers, cfg.ray_address)
    parts = list(range(plan["partitions"]))
    try:
        run_stage(executor, work, "map", files, progress=progress, seconds=seconds, sizes=plan["bytes"])
        run_stage(executor, work, "exact", parts, progress=progress, seconds=seconds)
        if plan["bands"]:
            run_stage(executor, work, "near", parts, progress=progress, seconds=seconds)
        decision = read_json(work / "decide.json") if (work / "decide.json").exists() else decide(work)
        if sum(decision["counts"].values()) == 0:
            report = merged_report(work, plan)
            exact_out = report["stages"]["exact_dedup"]["docs_out"]
            report["stages"]["near_dedup"].update(docs_in=exact_out, docs_out=0)
            raise DataError(empty_message(report, plan["files"]))
        if not (work / "tokenizer.json.meta").exists():
            if wanted is not None:
                tokenizer = wanted
            else:
                sample = iter_sample(iter_texts(work, plan), cfg.tokenizer_train_chars)
                tokenizer = train_tokenizer(cfg.tokenizer, sample, cfg.vocab_size)
            tokenizer.save(work / "tokenizer.json")
            tokenizer = load_tokenizer(work / "tokenizer.json")
            head = list(iter_sample(iter_texts(work, plan), TIKTOKEN_SAMPLE_CHARS))
            use_tiktoken = choose_encoder(cfg, tokenizer, head)
            write_json(
                work / "tokenizer.json.meta",
                {"use_tiktoken": use_tiktoken, "dtype": dtype_for(tokenizer.vocab_size)},
            )
        run_stage(executor, work, "tokenize", parts, progress=progress, seconds=seconds)
    finally:
        executor.close()
    splits, report = finish(work, out)
    shutil.copyfile(work / "tokenizer.json", out / "tokenizer.json")
    if plan["bands"]:  # the near-dedup decisions, for audits: ids (file index << 40 | position in file)
        shutil.copyfile(work / "removed.npy", out / "near_duplicates.npy")
    write_json(out / "report.json", report)
    write_json(out / "job.json", job_summary(work, plan, seconds))
    return {
        "tokenizer": load_tokenizer(out / "tokenizer.json"),
        "use_tiktoken": read_json(work / "tokenizer.json.meta")["use_tiktoken"],
        "splits": splits,
    }


def job_summary(work: Path, plan: dict, seconds: dict[str, float]) -> dict:
    """Per stage: units, documents, bytes, seconds, throughput and the peak RSS of its busiest worker."""
    stages = {}
    for stage, units in (
        ("map", len(plan["files"])),
        ("exact", plan["partitions"]),
        ("near", plan["partitions"] if plan["bands"] else 0),
        ("tokenize", plan["partitions"]),
    ):
        markers = [read_json(marker(work, stage, u)) for u in range(units)]
        docs = sum(m.get("docs", m.get("docs_in", 0)) for m in markers)
        nbytes = sum(m.get("bytes", 0) for m in markers)
        wall = seconds.get(stage, 0.0)  # this run's wall time (0 when every unit was done before)
        stages[stage] = {
            "units": units,
            "units_run": seconds.get(f"{stage}.units_run", 0),  # this run; the rest were done before
            "docs": docs,
            "bytes": nbytes,
            "seconds": round(wall, 3),
            "unit_seconds": round(sum(m["seconds"] for m in markers), 3),
            "mb_per_s": round(nbytes / 1e6 / wall, 3) if wall and stage != "near" else None,
            "peak_rss_mb": round(max((m["peak_rss_mb"] for m in markers), default=0.0), 1),
        }
    return {"partitions": plan["partitions"], "stages": stages}
