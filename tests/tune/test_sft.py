"""SFT: prompt tokens carry no loss, the response loss falls on real instruction data, LoRA merges exactly."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.checkpoint import load_model
from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import DataError
from lmforge.train.metrics import read_metrics
from lmforge.tune.lora import LoRAConfig, LoRALinear, apply_lora, merge_lora, trainable_parameters
from lmforge.tune.sft import (
    IGNORE,
    build_rows,
    finetune,
    load_examples,
    record_examples,
    tokenize_example,
)
from tests.conftest import require_transformers
from tests.infer.conftest import tiny_model

from .conftest import alpaca_records

FAST = ["train.micro_batch=8", "train.seq_len=256", "train.sample_tokens=8", "train.eval_batches=2"]


def test_prompt_tokens_carry_no_loss(base_checkpoint):
    """An Alpaca record is a user turn and an assistant turn of the chat template; only the assistant's text
    and its end-of-turn token are learned."""
    tokenizer = load_tokenizer(base_checkpoint / "tokenizer.json")
    record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    (segments,) = record_examples(record, "x:1")
    inputs, targets = tokenize_example(segments, tokenizer, max_tokens=200)
    prompt = "<|user|>\nAdd the numbers.\n\n2 and 3<|endoftext|><|assistant|>\n"
    n_prompt = len(tokenizer.encode(prompt)) - len("<|endoftext|>") + 1  # end-of-text is one token
    assert tokenizer.decode(inputs) == prompt + "5"
    # target j is token j+1: the first n_prompt - 1 targets are prompt tokens, then "5" and end-of-turn
    assert targets[: n_prompt - 1] == [IGNORE] * (n_prompt - 1)
    assert targets[n_prompt - 1 :] == tokenizer.encode("5") + [tokenizer.eot_id]
    # chat: only the assistant turns (each with its end-of-turn token) are learned
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "bye"},
        ]
    }
    (segments,) = record_examples(chat, "x:2")
    inputs, targets = tokenize_example(segments, tokenizer, max_tokens=200)
    learned = [t for t in targets if t != IGNORE]
    assert learned == tokenizer.encode("hello") + [tokenizer.eot_id] + tokenizer.encode("bye") + [
        tokenizer.eot_id
    ]
    assert "<|user|>" in tokenizer.decode(inputs)


def test_packing_keeps_examples_whole_and_separated():
    examples = [([1, 2, 3], [IGNORE, 3, 4]), ([5, 6], [6, 7]), ([8, 9, 10, 11], [IGNORE, IGNORE, 11, 12])]
    rows = build_rows(examples, seq_len=6, pad_id=0, pack=True)
    assert rows[0] == ([1, 2, 3, 5, 6, 0], [IGNORE, 3, 4, 6, 7, IGNORE], [0, 0, 0, 1, 1, 2])
    assert rows[1] == ([8, 9, 10, 11, 0, 0], [IGNORE, IGNORE, 11, 12, IGNORE, IGNORE], [0, 0, 0, 0, 1, 1])
    assert len(build_rows(examples, seq_len=6, pad_id=0, pack=False)) == 3


def test_response_loss_falls_on_alpaca(base_checkpoint, tmp_path):
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in alpaca_records(64)), encoding="utf-8")
    out = tmp_path / "sft"
    overrides = FAST + [
        "train.steps=30",
        "train.lr=3e-3",
        "train.warmup_steps=3",
        "train.log_every=5",
        "train.eval_every=30",
    ]
    result = finetune(
        base_checkpoint, data, out_dir=out, overrides=overrides, val_fraction=0.1, progress=False
    )
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert losses[-1] < 0.7 * losses[0], losses
    assert result.train_examples + result.val_examples + result.skipped_examples == 64
    model, _, _ = load_model(result.model_dir)  # the final model is a plain checkpoint
    assert model.cfg.vocab_size == load_tokenizer(base_checkpoint).vocab_size


def test_lora_starts_at_the_base_model_and_merges_exactly():
    torch.manual_seed(0)  # apply_lora draws lora_A from the global generator
    generator = torch.Generator().manual_seed(1)
    model = tiny_model()
    x = torch.randint(0, 257, (2, 10), generator=generator)
    before = model(x)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")))
    torch.testing.assert_close(model(x), before)
    trainable, total = trainable_parameters(model)
    assert (
        trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        and trainable < total / 5
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(generator=generator)
    adapted = model(x)
    assert not torch.allclose(adapted, before)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(tiny_model().state_dict())
    torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-4)


def test_lora_finetune_merges_and_exports(base_checkpoint, tmp_path):
    """The exported folder, loaded by transformers, gives the logits of the model as trained (base + scaled
    LoRA update, unmerged) and of the merged lmforge model; the in-training multiple-choice metric of the last
    step equals the one computed from transformers' log-likelihoods."""
    transformers = require_transformers()
    from lmforge.checkpoint import load_model_state
    from lmforge.config import load_config
    from lmforge.model.transformer import build_model

    data = tmp_path / "pr.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"Q{i}: ", "response": f"A{i % 3}"}) + "\n" for i in range(20))
    )
    task = tmp_path / "mc_val.jsonl"  # multiple choice inside training, on the live model, every 2 steps
    questions = [
        {"query": f"Q{i}: ", "choices": ["A0", "A1 and", "A2 or more"], "gold": i % 2} for i in range(6)
    ]
    task.write_text("".join(json.dumps(q) + "\n" for q in questions))
    lora = LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))
    overrides = FAST + ["train.steps=4", "train.lr=1e-2", "eval.every=2", f"eval.tasks=[{task}]"]
    result = finetune(
        base_checkpoint,
        data,
        out_dir=tmp_path / "run",
        overrides=overrides,
        lora=lora,
        export_hf=tmp_path / "hf",
        progress=False,
    )
    tuned, _, _ = load_model(result.model_dir)
    base, _, _ = load_model(base_checkpoint)
    changed = [n for n, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed and all("q_proj" in n or "v_proj" in n for n in changed)

    hf = transformers.AutoModelForCausalLM.from_pretrained(result.hf_dir, dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(result.hf_dir)
    last = tmp_path / "run" / "checkpoints" / "step_00000004"
    cfg = load_config(last / "config.yaml")
    trained = apply_lora(build_model(cfg.model, device="cpu"), lora)  # the model as trained: adapters apart
    trained.load_state_dict(load_model_state(last, cfg), strict=True)
    ids = torch.randint(0, tuned.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_logits = hf(ids).logits
        torch.testing.assert_close(hf_logits, tuned.eval()(ids), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(hf_logits, trained.eval()(ids), rtol=1e-4, atol=1e-4)
        assert (hf_logits - base.eval()(ids)).abs().max() > 1e-2  # and the update is not negligible

    def loglikelihood(context: str, continuation: str) -> float:  # the harness's split, by transformers
        ctx = hf_tokenizer(context.rstrip(), add_special_tokens=False)["input_ids"]
        whole = hf_tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = hf(torch.tensor([whole])).logits.double().log_softmax(-1)[0]
        return sum(logprobs[j - 1, whole[j]].item() for j in range(len(ctx), len(whole)))

    hits = hits_norm = 0
    for q in questions:
        lls = [loglikelihood(q["query"], " " + c) for c in q["choices"]]
        hits += max(range(3), key=lambda k: lls[k]) == q["gold"]
        hits_norm += max(range(3), key=lambda k: lls[k] / len(q["choices"][k])) == q["gold"]
    assert hits != hits_norm  # the two metrics differ here, so each is checked
    logged = [m for m in read_metrics(tmp_path / "run") if "mc/acc" in m]
    assert [m["step"] for m in logged] == [2, 4]
    assert logged[-1]["mc/acc"] == pytest.approx(hits / 6) and logged[-1]["mc/acc_norm"] == pytest.approx(
        hits_norm / 6
    )


def test_bad_records_name_file_and_line_and_write_nothing(base_checkpoint, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(
        json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "only"}) + "\n"
    )
    with pytest.raises(DataError, match=r"bad.jsonl:2: instruction record without output"):
        finetune(base_checkpoint, data, out_dir=tmp_path / "run", overrides=FAST)
    assert not (tmp_path / "run").exists()
    data.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: no instruction/output, prompt/response or messages"):
        load_examples(data)
    data.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: messages\[0\]"):
        load_examples(data)


def test_prompts_longer_than_the_context_are_refused_and_nothing_is_written(base_checkpoint, tmp_path):
    data = tmp_path / "long.jsonl"
    records = [{"prompt": "x" * 300, "response": "y"}, {"prompt": "z" * 400, "response": "w"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(
        DataError, match=r"long.jsonl: none of its 2 examples .* train.seq_len=256 .* shorten"
    ):
        finetune(base_checkpoint, data, out_dir=tmp_path / "run", overrides=FAST)
    assert not (tmp_path / "run").exists()
