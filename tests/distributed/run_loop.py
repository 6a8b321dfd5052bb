"""The training loop (``lmforge.train.loop.train``) on a rank-aware in-memory loader; runs as one process
or under torchrun. Each argument is one run ``OUT_DIR:STEPS:STRATEGY[:resume]``; rank 0 appends each run's
result to ``OUT_DIR/result.json``. Options apply to the runs after them. ``--die-at STEP`` makes rank 1
SIGKILL itself as it draws the batch of training step STEP, in the launcher's first attempt only (a fault at a
step the run announces, not at a moment a watcher happens to look);
``--timeout S`` sets ``parallel.timeout_s``; ``--tp N`` sets ``parallel.tp`` (each tensor-parallel group of N
consecutive ranks reads one data-parallel slice); ``--untied 1`` unties the output head; ``--offload 1`` sets
``parallel.cpu_offload=true``; ``--experts E`` makes the feed-forwards Mixture-of-Experts (E experts, top 2;
``--aux C`` sets ``model.moe.aux_loss_coef``, ``--bias-rate R`` ``model.moe.bias_update_rate``) and ``--ep N``
sets ``parallel.ep``; ``--accum A`` splits each rank's share of the global batch into A micro-batches;
``--ac 1`` sets ``train.activation_checkpointing=true``.

The loader draws global batch ``n`` as a pure function of ``n`` and gives each rank its slice, and its
state (batches drawn) does not depend on the world size, so runs on 1 and 2 processes see the same data.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

from lmforge.data.batch import Batch

GLOBAL_BATCH = 8
SEQ_LEN = 16
VOCAB = 64


class SlicedLoader:
    def __init__(self, *, rank: int, world_size: int, seed: int, die_at: int = 0, accum: int = 1):
        period = torch.randint(0, VOCAB, (97,), generator=torch.Generator().manual_seed(0))
        self.tokens = period.repeat(60)  # a learnable stream
        self.rank, self.world_size, self.seed, self.die_at = rank, world_size, seed, die_at
        self.vocab_size, self.tokenizer_path, self.batches = VOCAB, None, 0
        self.accum = accum  # micro-batches per step: the micro-batch k of every rank is one global slice
        self.batch_size = GLOBAL_BATCH // world_size // accum  # world_size: the data-parallel ranks

    def batch(self, index: int, micro: int = 0) -> Batch:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        starts = torch.randint(0, len(self.tokens) - SEQ_LEN - 1, (GLOBAL_BATCH,), generator=generator)
        rows = torch.stack([self.tokens[s : s + SEQ_LEN + 1] for s in starts.tolist()])  # (B, T+1)
        rows = rows.chunk(self.accum)[micro].chunk(self.world_size)[self.rank]  # (b, T+1)
        return Batch(rows[:, :-1].clone(), rows[:, 1:].clone())

    def next_batch(self) -> Batch:
        if self.batches + 1 == self.die_at:  # one micro-batch per step: this is the batch of step die_at
            os.kill(os.getpid(), signal.SIGKILL)
        self.batches += 1
        return self.batch((self.batches - 1) // self.accum, (self.batches - 1) % self.accum)

    def skip(self, n_batches: int) -> None:
        self.batches += n_batches

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["batches"])


def config(
    out_dir: str,
    steps: int,
    strategy: str,
    world_size: int,
    timeout_s: float = 60.0,
    tp: int = 1,
    untied=False,
    offload=False,
    moe: tuple[int, float, float] = (0, 0.0, 0.0),
    ep: int = 1,
    accum: int = 1,
    activation_checkpointing: bool = False,
):
    experts, aux, bias_rate = moe
    from lmforge.config import load_config

    return load_config(None, [
        f"model.vocab_size={VOCAB}", "model.n_layers=2", "model.d_model=32", "model.n_heads=2",
        "model.max_seq_len=32", f"train.out_dir={out_dir}", f"train.steps={steps}", f"train.seq_len={SEQ_LEN}",
        "train.log_every=1", "train.eval_every=1000",
        "train.ckpt_every=5", "train.keep_last=10", "train.schedule=constant", "train.warmup_steps=0",
        "train.lr=1e-2", "train.device=cpu", f"parallel.strategy={strategy}", f"parallel.timeout_s={timeout_s}",
        f"parallel.tp={tp}", f"model.tie_embeddings={'false' if untied else 'true'}",
        f"parallel.cpu_offload={'true' if offload else 'false'}", f"model.moe.n_experts={experts}",
        "model.moe.top_k=2", f"model.moe.aux_loss_coef={aux}", f"model.moe.bias_update_rate={bias_rate}",
        f"parallel.ep={ep}", f"train.micro_batch={GLOBAL_BATCH // (world_size // tp) // accum}",
        f"train.global_batch_tokens={GLOBAL_BATCH * SEQ_LEN}",
        f"train.activation_checkpointing={'true' if activation_checkpointing else 'false'}",
    ])  # fmt: skip


def main(argv: list[str]) -> None:
    from lmforge.train.loop import train

    options = {"--die-at": 0.0, "--timeout": 60.0, "--tp": 1.0, "--untied": 0.0, "--offload": 0.0}
    options.update(
        {"--experts": 0.0, "--aux": 0.0, "--bias-rate": 0.0, "--ep": 1.0, "--accum": 1.0, "--ac": 0.0}
    )
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    while argv:
        if argv[0] in options:  # an option applies to the runs after it
            options[argv[0]], argv = float(argv[1]), argv[2:]
            continue
        spec, argv = argv[0], argv[1:]
        tp, untied = int(options["--tp"]), bool(options["--untied"])
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        die_at = int(options["--die-at"]) if rank == 1 and first_attempt else 0
        out_dir, steps, strategy, *resume = spec.split(":")
        accum = int(options["--accum"])
        loader = SlicedLoader(
            rank=rank // tp, world_size=world_size // tp, seed=0, die_at=die_at, accum=accum
        )
        val = SlicedLoader(rank=0, world_size=1, seed=99)
        result = train(
            config(
                out_dir,
                int(steps),
                strategy,
                world_size,
                options["--timeout"],
                tp,
                untied,
                bool(options["--offload"]),
                (int(options["--experts"]), options["--aux"], options["--bias-rate"]),
                int(options["--ep"]),
                accum,
                bool(options["--ac"]),
            ),  # fmt: skip
            resume=resume[0] if resume else None,
            loader=loader,
            val_batches=lambda val=val: [val.batch(i) for i in range(2)],
            progress=False,
        )
        if rank == 0:
            losses = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
            curve = {r["step"]: r["loss"] for r in losses if "loss" in r}
            record = {"final_loss": result.final_loss, "step": result.step, "curve": curve}
            (Path(out_dir) / "result.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1:])
