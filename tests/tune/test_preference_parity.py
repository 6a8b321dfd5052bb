"""DPO against an independent reference: the loss, rewards and gradients lmforge computes on a fixed batch
equal those computed from ``transformers`` log-probs of the exported policy and reference models (and TRL's
DPO loss on the same batch)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmforge.checkpoint import save_checkpoint
from lmforge.config import Config
from lmforge.convert import export_model
from lmforge.infer.loading import load_for_inference
from lmforge.model.hf import to_hf_state_dict
from lmforge.model.transformer import build_model
from lmforge.tune.pairs import PairRecord, collate_pairs, tokenize_pairs
from lmforge.tune.preference import DPO, cache_reference
from lmforge.tune.sft import Segment
from tests.conftest import missing, require_transformers

PAIRS = [  # (prompt, chosen, rejected)
    ("say abc:", "ABC", "abc"),
    ("name a colour:\n", "red, of course", "blue"),
    ("2+2=", "4", "five or so"),
]
BETA, SMOOTHING = 0.5, 0.1
CPU = torch.device("cpu")


def perturbed_policy(base_dir, out):
    """The base weights plus seeded noise, so the policy and the reference differ."""
    loaded = load_for_inference(base_dir, device=CPU)
    gen = torch.Generator().manual_seed(1)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in loaded.model.state_dict().items()}
    cfg = Config(model=loaded.config.model)
    return save_checkpoint(out, model_state=state, config=cfg, tokenizer_file=loaded.tokenizer_path)


def hf_logps(hf_model, tokenizer, eot_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of (chosen, rejected) per pair, from the HF model's logits, by hand."""
    out = {"chosen": [], "rejected": []}
    for prompt, chosen, rejected in PAIRS:
        for side, answer in (("chosen", chosen), ("rejected", rejected)):
            prompt_ids = tokenizer.encode(prompt)
            ids = prompt_ids + tokenizer.encode(answer) + [eot_id]
            logits = hf_model(torch.tensor([ids[:-1]])).logits[0].float()  # (T, V)
            logprobs = logits.log_softmax(-1)
            out[side].append(sum(logprobs[t - 1, ids[t]] for t in range(len(prompt_ids), len(ids))))
    return torch.stack(out["chosen"]), torch.stack(out["rejected"])


def lmforge_dpo(policy_dir, base_dir, tokenizer, smoothing=SMOOTHING):
    """lmforge's DPO loss (summed over pairs), rewards and gradients (under HF names) on the fixed batch."""
    records = [
        PairRecord([Segment(p, False), Segment(c, True)], [Segment(p, False), Segment(r, True)], f"pair {i}")
        for i, (p, c, r) in enumerate(PAIRS)
    ]
    rows, skipped = tokenize_pairs(records, tokenizer, seq_len=64)
    assert not skipped
    reference = load_for_inference(base_dir, device=CPU).model
    rows = cache_reference(reference, rows, pad_id=0, device=CPU, precision="fp32", batch_size=2)
    policy = load_for_inference(policy_dir, device=CPU).model
    terms = DPO(beta=BETA, label_smoothing=smoothing).terms(policy, collate_pairs(rows, pad_id=0))
    terms.losses.sum().backward()
    grads = build_model(policy.cfg, device="cpu")
    grads.load_state_dict({n: p.grad for n, p in policy.named_parameters()}, strict=False)
    return terms, to_hf_state_dict(grads)


def test_dpo_loss_rewards_and_gradients_equal_a_transformers_computation(base_checkpoint, tmp_path):
    transformers = require_transformers()
    policy_dir = perturbed_policy(base_checkpoint, tmp_path / "policy")
    tokenizer = load_for_inference(base_checkpoint, device=CPU).require_tokenizer()
    terms, grads = lmforge_dpo(policy_dir, base_checkpoint, tokenizer)

    load = transformers.AutoModelForCausalLM.from_pretrained
    hf_policy = load(export_model(policy_dir, tmp_path / "hf_policy").out_dir, dtype=torch.float32)
    hf_reference = load(export_model(base_checkpoint, tmp_path / "hf_ref").out_dir, dtype=torch.float32)
    with torch.no_grad():
        ref_chosen, ref_rejected = hf_logps(hf_reference, tokenizer, tokenizer.eot_id)
    pol_chosen, pol_rejected = hf_logps(hf_policy, tokenizer, tokenizer.eot_id)
    delta = BETA * ((pol_chosen - ref_chosen) - (pol_rejected - ref_rejected))
    hf_loss = (-(1 - SMOOTHING) * F.logsigmoid(delta) - SMOOTHING * F.logsigmoid(-delta)).sum()
    hf_loss.backward()

    assert abs(terms.losses.sum().item() - hf_loss.item()) < 1e-5
    torch.testing.assert_close(
        terms.chosen_rewards, BETA * (pol_chosen - ref_chosen).detach(), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        terms.rejected_rewards, BETA * (pol_rejected - ref_rejected).detach(), atol=1e-5, rtol=0
    )
    hf_grads = {n: p.grad for n, p in hf_policy.named_parameters()}
    assert set(hf_grads) == set(grads)
    worst = max((grads[n] - hf_grads[n]).abs().max().item() for n in hf_grads)
    print(
        f"max |difference|: loss {abs(terms.losses.sum().item() - hf_loss.item()):.2e}, gradients {worst:.2e}"
    )
    assert worst < 1e-5, worst
    assert max(g.abs().max().item() for g in hf_grads.values()) > 1e-3  # the gradients are not trivially 0


def test_dpo_loss_equals_trls_on_the_same_batch(base_checkpoint, tmp_path):
    require_transformers()
    try:
        import trl
    except ImportError as e:
        missing(f"TRL is not installed ({e}); pip install -e '.[dev]'")
    policy_dir = perturbed_policy(base_checkpoint, tmp_path / "policy")
    tokenizer = load_for_inference(base_checkpoint, device=CPU).require_tokenizer()
    terms, _ = lmforge_dpo(policy_dir, base_checkpoint, tokenizer, smoothing=0.0)  # TRL's sigmoid loss
    ours = terms.losses.mean().item()  # TRL averages over pairs
    theirs = trl_dpo_loss(trl, export_model(policy_dir, tmp_path / "hf_policy").out_dir,
                          export_model(base_checkpoint, tmp_path / "hf_ref").out_dir, tokenizer, tmp_path)  # fmt: skip
    print(f"DPO loss per pair: lmforge {ours:.8f}, TRL {theirs:.8f}, |difference| {abs(ours - theirs):.2e}")
    assert math.isfinite(theirs) and abs(ours - theirs) < 1e-5, (ours, theirs)


def trl_dpo_loss(trl, policy_dir, reference_dir, tokenizer, tmp_path) -> float:
    """TRL's DPOTrainer loss (``loss_type="sigmoid"``) on the same token ids: [chosen rows; rejected rows], the
    completion mask on answer + end-of-text, right padding."""
    import transformers
    from datasets import Dataset

    rows, completion = [], []
    for side in (1, 2):
        for pair in PAIRS:
            prompt_ids = tokenizer.encode(pair[0])
            answer_ids = tokenizer.encode(pair[side]) + [tokenizer.eot_id]
            rows.append(prompt_ids + answer_ids)
            completion.append([0] * len(prompt_ids) + [1] * len(answer_ids))
    width = max(len(r) for r in rows)
    pad = lambda r: r + [0] * (width - len(r))  # noqa: E731
    inputs = {
        "input_ids": torch.tensor([pad(r) for r in rows]),
        "attention_mask": torch.tensor([pad([1] * len(r)) for r in rows]),
        "completion_mask": torch.tensor([pad(c) for c in completion]),
    }
    load = transformers.AutoModelForCausalLM.from_pretrained
    trainer = trl.DPOTrainer(
        model=load(policy_dir, dtype=torch.float32),
        ref_model=load(reference_dir, dtype=torch.float32),
        args=trl.DPOConfig(
            output_dir=str(tmp_path / "trl"),
            beta=BETA,
            loss_type=["sigmoid"],
            report_to=[],
            use_cpu=True,
            bf16=False,
        ),
        train_dataset=Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]),
        processing_class=transformers.AutoTokenizer.from_pretrained(policy_dir),
    )
    with torch.no_grad():
        return trainer._compute_loss(trainer.model, inputs, False).item()
