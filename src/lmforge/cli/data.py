"""``lmforge data prepare``, ``lmforge data verify`` and ``lmforge data train-quality``."""

from __future__ import annotations

import json

# -- data ---------------------------------------------------------------------------------------------------


def add_data(sub) -> None:
    p = sub.add_parser("data", help="prepare token shards from raw text")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    prep = dsub.add_parser("prepare", help="read, clean, tokenize and shard sources into a dataset folder")
    prep.add_argument(
        "items",
        nargs="*",
        metavar="[CONFIG] [SOURCES...] [overrides]",
        help="an optional YAML config, then files/folders/globs, then dotted overrides (data.vocab_size=8000)",
    )
    prep.add_argument("--out", required=True, help="the dataset folder to write")
    prep.add_argument("--strict", action="store_true", help="abort on a malformed record (default: skip it)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bars")
    prep.add_argument("--json", action="store_true", help="print meta.json instead of the tables")
    prep.add_argument(
        "--tasks", type=int, help="run as N independent array tasks (with --task-index or --slurm)"
    )
    prep.add_argument(
        "--task-index", type=int, help="this task's index (0..N-1): it runs its share and stops"
    )
    prep.add_argument(
        "--slurm", metavar="SCRIPT", help="write an sbatch script for --tasks array tasks + merge"
    )
    verify = dsub.add_parser(
        "verify", help="check a prepared folder: every shard present, at full size, with its recorded SHA-256"
    )
    verify.add_argument("folder", help="the prepared dataset folder")
    qual = dsub.add_parser(
        "train-quality", help="train a quality filter (data.quality_model) on good and bad example documents"
    )
    qual.add_argument("--positive", nargs="+", required=True, help="files/folders/globs of good documents")
    qual.add_argument("--negative", nargs="+", required=True, help="files/folders/globs of bad documents")
    qual.add_argument("--out", required=True, help="the model file to write (.safetensors)")
    qual.add_argument(
        "--holdout", type=float, default=0.1, help="share of each side kept aside to measure (default 0.1)"
    )
    qual.add_argument("--seed", type=int, default=0, help="seed of the held-out draw")
    qual.add_argument("--config", help="a YAML config whose data section says how files are cut")


def run_train_quality(args) -> int:
    from lmforge.config import load_config
    from lmforge.data.quality_training import train_quality

    cfg = load_config(args.config, []).data
    result = train_quality(args.positive, args.negative, args.out, cfg, holdout=args.holdout, seed=args.seed)
    held = result["held_out"]
    print(
        f"trained on {result['train_positives']:,} positive and {result['train_negatives']:,} negative "
        f"documents; held out {held['positives']:,} + {held['negatives']:,}: precision {held['precision']:.3f}, "
        f"recall {held['recall']:.3f} at score >= 0.5"
    )
    print(f"wrote {result['model']}: use it with data.quality_model={result['model']}")
    return 0


def run_data(args) -> int:
    if args.data_cmd == "train-quality":
        return run_train_quality(args)
    from lmforge.data.clean import format_report
    from lmforge.data.job import Task
    from lmforge.data.prepare import prepare_from_arguments, write_slurm_script
    from lmforge.errors import ConfigError, DataError

    if args.data_cmd == "verify":
        from lmforge.data.prepare import prepared_problem

        problem = prepared_problem(args.folder, checksums=True)
        if problem is not None:
            raise DataError(f"{args.folder}: {problem}; prepare it again")
        print(f"{args.folder}: every shard present, at full size, with the SHA-256 meta.json records")
        return 0
    if args.slurm:
        if not args.tasks:
            raise ConfigError("--slurm needs --tasks N (the number of array tasks)")
        path = write_slurm_script(args.items, args.out, tasks=args.tasks, path=args.slurm)
        print(f"wrote {path}: submit with `bash {path} submit`")
        return 0
    if (args.tasks is None) != (args.task_index is None):
        raise ConfigError("--task-index and --tasks go together (task i of N)")
    if args.tasks is not None and not 0 <= args.task_index < args.tasks:
        raise ConfigError(f"--task-index={args.task_index} must be in 0..{args.tasks - 1}")
    task = Task(index=args.task_index, count=args.tasks) if args.tasks is not None else None
    prepared = prepare_from_arguments(
        args.items, args.out, progress=not args.no_progress, strict=args.strict, task=task
    )
    if prepared.task is not None:
        t = prepared.task
        print(
            f"task {t['task']} of {t['tasks']}: {t['files']} inputs, {t['docs']:,} documents, "
            f"{t['bytes'] / 1e6:.1f} MB in {t['seconds']:.1f} s; run without --task-index to merge"
        )
        return 0
    meta, src = prepared.meta, prepared.report["sources"]
    if args.json:
        print(json.dumps(meta, indent=2, ensure_ascii=False))
        return 0
    print(format_report(prepared.report))
    print(
        f"inputs {src['files']:,} ({src['bytes'] / 1e6:.1f} MB), binary skipped {src['binary_skipped']}, "
        f"invalid UTF-8 files {src['invalid_utf8_files']} ({src['invalid_utf8_chars']} chars replaced), "
        f"malformed records {src['malformed_records']}, damaged files skipped {src.get('damaged_skipped', 0)}, "
        f"documents cut at data.max_chars {src.get('cut_documents', 0)}"
    )
    for example in src["malformed_examples"][:5]:
        print(f"  skipped {example}")
    for damaged in src.get("damaged_files", [])[:5]:
        print(f"  skipped damaged {damaged}")
    for split, info in meta["splits"].items():
        shards = len(info["shards"])
        print(f"{split:<6} {info['docs']:>10,} docs {info['tokens']:>14,} tokens in {shards} shards")
    print(
        f"wrote {args.out}: {meta['dtype']} shards, vocab {meta['vocab_size']}, "
        f"tokenizer {meta['tokenizer_fingerprint']}"
    )
    return 0
