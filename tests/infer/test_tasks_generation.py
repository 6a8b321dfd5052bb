"""Generative tasks end to end: greedy predictions equal transformers ``generate`` on the exported model,
and fine-tuning on a task's training split moves its metric the right way."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.infer.tasks import TaskOptions, load_spec, run_task
from tests.conftest import require_transformers

from .conftest import ByteTokenizer, tiny_model

CPU = torch.device("cpu")


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_greedy_predictions_equal_transformers_generate_on_the_exported_model(tmp_path):
    transformers = require_transformers()
    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import Config
    from lmforge.convert import export_model
    from lmforge.data.tokenizer import char_tokenizer
    from lmforge.infer.loading import load_for_inference

    tokenizer = char_tokenizer([chr(c) for c in range(32, 127)] + ["\n"])
    tok_file = tokenizer.save(tmp_path / "tok" / "tokenizer.json")
    model = tiny_model(seed=5, vocab_size=tokenizer.vocab_size, max_seq_len=64)
    ckpt = save_checkpoint(
        tmp_path / "ckpt",
        model_state=model.state_dict(),
        config=Config(model=model.cfg),
        tokenizer_file=tok_file,
    )
    hf_dir = tmp_path / "hf"
    export_model(ckpt, hf_dir, verify=False)
    records = [{"text": "the cat " * (1 + i % 3) + str(i), "summary": f"s{i}"} for i in range(10)]
    write_jsonl(tmp_path / "sum.jsonl", records)
    (tmp_path / "sum.yaml").write_text(
        'kind: summarization\ndata: sum.jsonl\nprompt: "{text}\\nTL;DR:"\nanswer: " {summary}"\n'
        'references: summary\ndocument: text\nstop: ["\\n", "."]\nmax_new_tokens: 12\n',
        encoding="utf-8",
    )
    loaded = load_for_inference(ckpt, device=CPU)
    result = run_task(
        loaded.model,
        loaded.tokenizer,
        load_spec(tmp_path / "sum.yaml"),
        TaskOptions(num_fewshot=1, batch_size=4),
        device=CPU,
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf.generation_config.eos_token_id = None  # lmforge stops at end-of-text: cut below instead
    hf.generation_config.pad_token_id = 0
    eot = loaded.tokenizer.eot_id
    for sample in result.samples:
        ids = loaded.tokenizer.encode(sample["prompt"])
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
        if eot in out:
            out = out[: out.index(eot)]
        text = loaded.tokenizer.decode(out)
        for stop in ("\n", "."):
            text = text.split(stop)[0]
        assert sample["prediction"] == text, sample
    assert len({s["prediction"] for s in result.samples}) > 1  # not one constant string


def shift(word: str) -> str:
    return "".join(chr((ord(c) - 97 + 1) % 8 + 97) for c in word)


def test_fine_tuning_on_the_training_split_raises_exact_match(tmp_path):
    """A synthetic task (a fixed letter mapping, 'abch' -> 'bcda'): exact match on held-out words before and
    after training on the task's training split with the language-modelling loss."""
    rng = random.Random(0)
    words = sorted({"".join(rng.choice("abcdefgh") for _ in range(4)) for _ in range(600)})
    rng.shuffle(words)
    test, train = words[:32], words[32:]
    write_jsonl(tmp_path / "test.jsonl", [{"src": w, "tgt": shift(w)} for w in test])
    (tmp_path / "map.yaml").write_text(
        'kind: qa\ndata: test.jsonl\nprompt: "{src}="\nanswer: "{tgt}"\nreferences: tgt\n'
        'stop: ["\\n"]\nmax_new_tokens: 6\n',
        encoding="utf-8",
    )
    spec, tok = load_spec(tmp_path / "map.yaml"), ByteTokenizer()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains several times faster on one thread
    try:
        before, after = train_and_measure(spec, tok, train)
    finally:
        torch.set_num_threads(threads)
    assert before == 0.0
    assert after.metrics["exact_match"] >= 75.0, after.samples[:3]


def train_and_measure(spec, tok, train):
    torch.manual_seed(0)
    model = tiny_model(seed=0, max_seq_len=16)
    before = run_task(model, tok, spec, device=CPU).metrics["exact_match"]

    rows = torch.tensor(
        [tok.encode(f"{w}={shift(w)}\n") for w in train]
    )  # (N, 10): as the prompt is laid out
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(100):
        batch = rows[torch.randint(0, len(rows), (64,))]
        logits = model(batch[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return before, run_task(model, tok, spec, device=CPU)
