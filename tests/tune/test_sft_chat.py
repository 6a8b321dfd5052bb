"""Chat fine-tuning end to end: multi-turn SFT through the chat template, the template saved with the run and
exported, transformers' ``apply_chat_template`` + ``generate`` giving lmforge's prompt and reply, replies
that stop by themselves at the end of the turn, conversations cut at turn boundaries, the model card's lineage."""

from __future__ import annotations

import io
import json
import random

import pytest
import torch

from lmforge.cli import main
from lmforge.data.tokenizer import load_tokenizer
from lmforge.infer.chat import encode_chat, read_chat_template, special_token_ids
from lmforge.infer.generate import SamplingConfig
from lmforge.infer.loading import open_chat
from lmforge.tune.sft import DEFAULT_TEMPLATE, finetune, record_examples, tokenize_conversation
from tests.conftest import require_transformers

CPU = torch.device("cpu")
# A synthetic chat task: each question has one short answer; conversations of 1-3 turns, half with a system
# prompt. The model has to learn the answers and to end each turn with the end-of-turn token.
ANSWERS = {
    "hi": "hello",
    "bye": "see you",
    "name?": "lmforge",
    "2+2?": "4",
    "color?": "blue sky",
    "ok": "fine",
}
TRAIN = [
    "train.steps=100",
    "train.lr=5e-3",
    "train.warmup_steps=5",
    "train.seq_len=128",
    "train.micro_batch=8",
    "train.eval_every=1000",
    "train.log_every=40",
    "train.sample_tokens=8",
]


def conversation(rng: random.Random, turns: int) -> list[dict]:
    messages = [{"role": "system", "content": "Be brief."}] if rng.random() < 0.5 else []
    for _ in range(turns):
        question = rng.choice(sorted(ANSWERS))
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": ANSWERS[question]},
        ]
    return messages


@pytest.fixture
def chat_model(base_checkpoint, tmp_path):
    """The tiny base model (with a model card, as a pre-training run leaves one) fine-tuned on 64 synthetic
    conversations, and exported."""
    base_card = "# base\n\n## Data\n\n- /corpus/tinyshakespeare.txt\n\nCleaning report: kept 40,000 lines\n"
    (base_checkpoint / "MODEL_CARD.md").write_text(base_card)
    readme = "| File | Records | License |\n|---|---|---|\n| `chat.jsonl` | 64 | CC0-1.0 |\n"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "README.md").write_text("# Synthetic chats\n\n" + readme)
    data = tmp_path / "data" / "chat.jsonl"
    rng = random.Random(0)
    data.write_text(
        "".join(json.dumps({"messages": conversation(rng, rng.randint(1, 3))}) + "\n" for _ in range(64))
    )
    result = finetune(
        base_checkpoint,
        data,
        out_dir=tmp_path / "run",
        overrides=TRAIN,
        val_fraction=0.0,
        export_hf=tmp_path / "hf",
        progress=False,
    )
    return result


@pytest.mark.slow  # fine-tunes for 100 steps (about 30 s on two CPU cores)
def test_chat_finetune_exports_the_template_and_transformers_replies_as_lmforge(
    chat_model, tmp_path, monkeypatch, capsys
):
    transformers = require_transformers()
    result = chat_model
    # the template trained with is in the run's checkpoints, the final model and the export
    last = sorted((result.run_dir / "checkpoints").iterdir())[-1]
    for folder in (last, result.model_dir, result.hf_dir):
        assert read_chat_template(folder).is_default, folder
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(result.hf_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(result.hf_dir, dtype=torch.float32).eval()
    session, notice = open_chat(
        result.model_dir, SamplingConfig(max_new_tokens=40, temperature=0.0), device=CPU
    )
    assert notice is None
    tokenizer = session.tokenizer
    rng = random.Random(1)
    stopped = correct = 0
    for _ in range(20):
        messages = conversation(rng, rng.randint(1, 3))
        history, question = messages[:-2], messages[-2]["content"]
        # byte for byte: the prompt transformers builds is the prompt lmforge trains and generates with
        prompt = session.template.render(history + [messages[-2]], add_generation_prompt=True)
        expected = hf_tokenizer.apply_chat_template(
            history + [messages[-2]], tokenize=False, add_generation_prompt=True
        )
        assert prompt == expected
        ids = hf_tokenizer(expected, add_special_tokens=False, return_tensors="pt")["input_ids"]
        assert ids[0].tolist() == encode_chat(tokenizer, prompt, session.specials)
        session.messages = list(history)
        reply = session.send(question)
        with torch.no_grad():
            out = hf_model.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1] :].tolist()
        if out and out[-1] == hf_model.config.eos_token_id:
            out = out[:-1]
        assert reply.tokens == out, (question, reply.text, hf_tokenizer.decode(out))
        stopped += reply.finish_reason == "eos"
        correct += reply.text == ANSWERS[question]
    print(f"stopped by themselves at the end of the turn: {stopped}/20; right answers: {correct}/20")
    assert stopped == 20 and correct >= 18

    # the same conversation through `lmforge chat` on the exported folder
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nname?\n/exit\n"))
    assert main(["chat", str(result.hf_dir), "--temperature", "0", "--max-new-tokens", "40"]) == 0
    out, err = capsys.readouterr()
    assert out.split("\n")[:2] == ["hello", "lmforge"]
    assert "no chat template" not in err

    # the model card records the lineage: this stage's data and licence, then the base model's card
    card = (chat_model.model_dir / "MODEL_CARD.md").read_text()
    assert "chat.jsonl`: 64 records, 64 examples; licence: CC0-1.0" in card
    assert "supervised fine-tuning (SFT)" in card and "## Lineage" in card
    assert "sources not recorded" not in card
    assert "Chat template: the default lmforge template" in card
    base_part = card[card.index("### Base model card") :]
    assert (
        "### base" in base_part and "#### Data" in base_part and "- /corpus/tinyshakespeare.txt" in base_part
    )
    readme = (chat_model.hf_dir / "README.md").read_text()
    assert readme == card


def test_long_conversations_are_cut_at_turn_boundaries(base_checkpoint):
    tokenizer = load_tokenizer(base_checkpoint / "tokenizer.json")
    specials = special_token_ids(tokenizer, DEFAULT_TEMPLATE)
    messages = []
    for k in range(4):
        messages += [
            {"role": "user", "content": f"question {k}"},
            {"role": "assistant", "content": f"answer {k}!"},
        ]
    (segments,) = record_examples({"messages": messages}, "x:1")
    whole = tokenize_conversation(segments, tokenizer, 1000, specials)
    turn_ends = [i + 1 for i, t in enumerate(whole.targets) if t == tokenizer.eot_id]  # learned ones only
    assert len(turn_ends) == 4 and whole.cut_turns == 0
    for limit in range(turn_ends[0], len(whole.inputs) + 1):
        cut = tokenize_conversation(segments, tokenizer, limit, specials)
        kept = max(n for n in turn_ends if n <= limit)  # inputs up to the last whole assistant turn that fits
        assert cut.inputs == whole.inputs[:kept] and cut.targets == whole.targets[:kept]
        assert cut.cut_turns == 4 - turn_ends.index(kept) - 1
        assert cut.targets[-1] == tokenizer.eot_id  # a kept turn always ends with its end-of-turn token
    too_short = tokenize_conversation(segments, tokenizer, turn_ends[0] - 1, specials)
    assert too_short.inputs == [] and too_short.cut_turns == 4
