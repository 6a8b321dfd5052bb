"""Run under ``torchrun --nproc-per-node 2``: DDP and FSDP loss curves, a 2-rank sharded checkpoint, and a
resume of a 1-rank checkpoint on 2 ranks. Writes ``<out>/results.json`` from rank 0."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from steps import MODEL, SAVE_AT, STEPS, make_model, make_optimizer, train_steps

from lmforge.checkpoint import load_model_state, load_train_state
from lmforge.checkpoint.sharded import load_full_into, load_sharded, save_sharded
from lmforge.config import Config, ParallelConfig
from lmforge.distributed.parallelize import close_world, init_world, parallelize


def main(out: Path) -> None:
    torch.manual_seed(0)
    world = init_world(ParallelConfig(world_size=2), torch.device("cpu"))
    results = {}
    for strategy in ("ddp", "fsdp"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = parallelize(make_model(), ParallelConfig(strategy=strategy), world)
            optimizer = make_optimizer(model)
            results[strategy] = train_steps(model, optimizer, world, 0, STEPS)
        results[f"{strategy}_warnings"] = sorted({str(w.message) for w in caught})

    # FSDP's bf16 mixed precision: bf16 gathers and compute, fp32 sharded master weights.
    model = parallelize(make_model(), ParallelConfig(strategy="fsdp"), world, precision="bf16")
    optimizer = make_optimizer(model)
    results["fsdp_bf16"] = train_steps(model, optimizer, world, 0, STEPS)
    results["fsdp_bf16_master_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})

    # 2 ranks write a sharded checkpoint at SAVE_AT (the test resumes it on 1 rank) ...
    model = parallelize(make_model(), ParallelConfig(strategy="fsdp"), world)
    optimizer = make_optimizer(model)
    train_steps(model, optimizer, world, 0, SAVE_AT)
    save_sharded(
        out / "by2",
        model=model,
        optimizer=optimizer,
        config=Config(model=MODEL),
        world=world,
        train_state={"step": SAVE_AT},
        rank_state={"rank": world.rank},
    )

    # ... and continue, on 2 ranks, the checkpoint the test wrote with 1 process.
    model = parallelize(make_model(), ParallelConfig(strategy="fsdp"), world)
    optimizer = make_optimizer(model)
    restored = load_sharded(out / "by1", model=model, optimizer=optimizer, world=world)
    start = restored.train_state["step"]
    results["resumed_from_1"] = train_steps(model, optimizer, world, start, STEPS)
    results["by1_rank_state"] = restored.rank_state(world)

    # ... and an ordinary single-process checkpoint (model.safetensors + optimizer.state_dict()), under DDP.
    model = parallelize(make_model(), ParallelConfig(strategy="ddp"), world)
    optimizer = make_optimizer(model)
    config = Config(model=MODEL)
    state = load_train_state(out / "plain")
    load_full_into(
        model,
        optimizer,
        model_state=load_model_state(out / "plain", config),
        optimizer_state=state["optimizer"],
    )
    results["resumed_plain_from_1"] = train_steps(model, optimizer, world, state["step"], STEPS)
    if world.is_main:
        (out / "results.json").write_text(json.dumps(results))
    close_world(world)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
