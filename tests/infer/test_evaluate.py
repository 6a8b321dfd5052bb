"""Evaluation: log-likelihoods agree with transformers, acc/acc_norm follow from them, perplexity is exact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.errors import DataError
from lmforge.infer.evaluate import (
    accuracy,
    choice_loglikelihoods,
    evaluate_choice_task,
    load_choice_task,
    score_text,
)
from lmforge.infer.suite import format_table, task_metrics
from tests.conftest import SHARED_DATA, require_shared_data, require_transformers

from .conftest import ByteTokenizer, hf_llama, tiny_model

CPU = torch.device("cpu")
HELLASWAG = SHARED_DATA / "eval" / "hellaswag_val.jsonl"

RECORDS = [
    {
        "activity_label": "Cooking",
        "ctx": "A man cracks an egg. he",
        "endings": ["fries it.", "sings a long song to it.", "x", "eats the pan."],
        "label": 0,
    },
    {
        "activity_label": "Sport",
        "ctx": "The boy runs. the boy",
        "endings": ["jumps [title] high.", "falls", "sits down on the track."],
        "label": 2,
    },
    {
        "activity_label": "Music",
        "ctx": "She plays a violin. she",
        "endings": ["bows.", "stops and smiles at the crowd.", "hums"],
        "label": 1,
    },
    {"query": "Question: which is heavier?\n", "choices": ["a ton of lead", "a feather"], "gold": 0},
]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def hf_loglikelihood(hf, context: str, ending: str, window: int | None = None) -> float:
    """log P(" " + ending | context) from transformers' logits, byte tokens (independent of lmforge). As in
    the harness, whitespace that ends the context belongs to the continuation, and a pair longer than the
    ``window`` loses its first tokens (the model sees the last ``window`` inputs)."""
    stripped = context.rstrip()
    ctx, cont = list(stripped.encode()), list((context[len(stripped) :] + " " + ending).encode())
    ids = ctx + cont
    if window is not None:
        ids = ids[-(window + 1) :]
    with torch.no_grad():
        logprobs = hf(torch.tensor([ids[:-1]])).logits.double().log_softmax(-1)[0]  # (T, V)
    first = len(ids) - len(cont)  # the first continuation token's position in ids
    return sum(logprobs[first + j - 1, tok].item() for j, tok in enumerate(cont))


def test_choice_loglikelihoods_match_transformers_and_give_acc(tmp_path):
    model, tokenizer = tiny_model(seed=1, max_seq_len=128), ByteTokenizer()
    hf = hf_llama(model)
    items = load_choice_task(write_jsonl(tmp_path / "mc.jsonl", RECORDS))
    assert items[1].choices[0] == "jumps. high."  # the harness's cleanup of WikiHow markers
    assert items[0].context == "Cooking: A man cracks an egg. he"
    ours = choice_loglikelihoods(model, tokenizer, items, device=CPU, batch_size=3)
    expected_hits, expected_norm = [], []
    for item, lls in zip(items, ours):
        reference = [hf_loglikelihood(hf, item.context, c) for c in item.choices]
        assert max(abs(a - b) for a, b in zip(lls, reference)) <= 1e-4
        expected_hits.append(max(range(len(reference)), key=reference.__getitem__) == item.gold)
        normed = [ll / len(c) for ll, c in zip(reference, item.choices)]
        expected_norm.append(max(range(len(normed)), key=normed.__getitem__) == item.gold)
    result = accuracy(items, ours)
    assert result["acc"] == pytest.approx(sum(expected_hits) / len(items))
    assert result["acc_norm"] == pytest.approx(sum(expected_norm) / len(items))
    assert result["n"] == 4


def test_acc_norm_divides_by_characters():
    from lmforge.infer.evaluate import ChoiceItem

    item = ChoiceItem(context="c", choices=("ab", "abcdefgh"), gold=1, where="t:1")
    # raw: -4 beats -6; per character: -6/8 = -0.75 beats -4/2 = -2
    result = accuracy([item], [[-4.0, -6.0]])
    assert result["acc"] == 0.0 and result["acc_norm"] == 1.0


def test_perplexity_of_a_uniform_model_is_the_vocabulary():
    model, tokenizer = tiny_model(), ByteTokenizer()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # zero norm weights make every logit 0: a uniform distribution over 257 tokens
    score = score_text(model, tokenizer, "héllo wörld " * 20, device=CPU, seq_len=16)
    assert score.tokens == len(("héllo wörld " * 20).encode()) == score.bytes
    assert score.perplexity == pytest.approx(257, rel=1e-5)
    assert score.bits_per_byte == pytest.approx(math.log2(257), rel=1e-5)


def test_perplexity_windows_match_transformers():
    model, tokenizer = tiny_model(seed=2), ByteTokenizer()
    hf = hf_llama(model)
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
    ids = [256] + list(text.encode())
    seq_len, total = 20, 0.0
    for start in range(0, len(ids) - 1, seq_len):  # independent windows of 20 predictions
        piece = torch.tensor([ids[start : start + seq_len + 1]])
        with torch.no_grad():
            logits = hf(piece[:, :-1]).logits
        total += torch.nn.functional.cross_entropy(logits[0], piece[0, 1:], reduction="sum").item()
    score = score_text(model, tokenizer, text, device=CPU, seq_len=seq_len, batch_size=2)
    assert score.nll == pytest.approx(total, rel=1e-5)
    assert score.bits_per_byte == pytest.approx(total / (len(text.encode()) * math.log(2)), rel=1e-5)


def test_real_hellaswag_file_and_task_metrics(tmp_path):
    """Per-item log-likelihoods of real HellaSwag lines against transformers, on the model exported to a
    Hugging Face folder by lmforge's export and loaded by transformers itself; acc and acc_norm follow."""
    require_shared_data("eval/hellaswag_val.jsonl")
    transformers = require_transformers()
    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import Config
    from lmforge.convert import export_model

    items = load_choice_task(HELLASWAG, limit=5)
    assert items[0].context == "Roof shingle removal: A man is sitting on a roof. he" and items[0].gold == 3
    longest = max(len(f"{i.context} {c}".encode()) for i in items for c in i.choices)
    assert longest > 257  # line 3 is longer than the window: it is cut on the left, as in the harness
    model = tiny_model(seed=3, max_seq_len=256)
    ckpt = save_checkpoint(tmp_path / "ckpt", model_state=model.state_dict(), config=Config(model=model.cfg))
    export_model(ckpt, tmp_path / "hf", verify=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()

    ours = choice_loglikelihoods(model, ByteTokenizer(), items, device=CPU, batch_size=4)
    hits, hits_norm = [], []
    for item, lls in zip(items, ours):
        reference = [hf_loglikelihood(hf, item.context, c, window=256) for c in item.choices]
        assert max(abs(a - b) for a, b in zip(lls, reference)) <= 1e-4, item.where
        hits.append(int(np.argmax(reference)) == item.gold)
        hits_norm.append(int(np.argmax([ll / len(c) for ll, c in zip(reference, item.choices)])) == item.gold)
    metrics = task_metrics(model, ByteTokenizer(), [HELLASWAG], device=CPU, limit=5)
    assert metrics == pytest.approx(
        {"hellaswag/acc": sum(hits) / 5, "hellaswag/acc_norm": sum(hits_norm) / 5}
    )
    result = evaluate_choice_task(model, ByteTokenizer(), HELLASWAG, device=CPU, limit=5)
    assert (result["acc"], result["acc_norm"], result["n"]) == (sum(hits) / 5, sum(hits_norm) / 5, 5)
    assert "hellaswag" in format_table({"hellaswag": result})


def test_malformed_task_lines_name_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl", [RECORDS[0], {"activity_label": "x", "endings": ["a", "b"], "label": 0}]
    )
    with pytest.raises(DataError, match=r"bad.jsonl:2: HellaSwag record without ctx"):
        load_choice_task(path)
    path.write_text(json.dumps(RECORDS[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_choice_task(path)
    path.write_text(json.dumps({**RECORDS[0], "label": 7}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:1: gold label 7"):
        load_choice_task(path)
    path.write_text(json.dumps({"text": "hello"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:1: not a multiple-choice record"):
        load_choice_task(path)


# -- prepared validation shards ----------------------------------------------------------------------------


def prepare_corpus(tmp_path: Path, tokenizer_chars: str, name: str = "prepared") -> tuple[Path, list[str]]:
    """Unique documents with multi-byte characters, prepared with a char tokenizer into small shards."""
    from lmforge.config import DataConfig
    from lmforge.data.prepare import prepare_data
    from lmforge.data.tokenizer import char_tokenizer

    rng = np.random.default_rng(0)
    words = np.array(["café", "naïve", "the", "cat", "sat", "über", "a", "mat"])
    docs = [f"{i}: " + " ".join(rng.choice(words, rng.integers(3, 12))) for i in range(30)]
    source = write_jsonl(tmp_path / f"{name}.jsonl", [{"text": d} for d in docs])
    tok_file = char_tokenizer(tokenizer_chars).save(tmp_path / f"{name}_tok" / "tokenizer.json")
    cfg = DataConfig(tokenizer=str(tok_file), val_fraction=0.5, shard_tokens=300, seed=3)
    prepare_data(cfg, [str(source)], tmp_path / name, progress=False)
    return tmp_path / name, docs


def read_val_stream(folder: Path) -> tuple[np.ndarray, int]:
    """The val split's tokens read straight from the shard files (independent of lmforge's loader)."""
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    shards = meta["splits"]["val"]["shards"]
    stream = np.concatenate([np.fromfile(folder / s["file"], dtype=meta["dtype"]) for s in shards])
    return stream.astype(np.int64), int(meta["eot_id"])


def hf_windows_nll(hf, tokens: list[int], seq_len: int) -> float:
    """Summed NLL of tokens[1:] from transformers' logits over windows of seq_len predictions (the full
    windows in one batch, then the shorter last one)."""
    n_full = (len(tokens) - 1) // seq_len
    pieces = [torch.tensor(tokens[k * seq_len : (k + 1) * seq_len + 1]) for k in range(n_full)]
    batches = [torch.stack(pieces)] if pieces else []
    if n_full * seq_len < len(tokens) - 1:
        batches.append(torch.tensor(tokens[n_full * seq_len :])[None])
    total = 0.0
    for batch in batches:
        with torch.no_grad():
            logits = hf(batch[:, :-1]).logits.double()  # (B, T, V)
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"
        )
    return float(total)


CHARS = "0123456789: abcdefghijklmnopqrstuvwxyzéïü"


def test_prepared_val_split_matches_transformers_and_counts_bytes(tmp_path):
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.infer.evaluate import score_prepared

    folder, docs = prepare_corpus(tmp_path, CHARS)
    tokenizer = load_tokenizer(folder)
    model = tiny_model(vocab_size=tokenizer.vocab_size, max_seq_len=32)
    hf = hf_llama(model)
    stream, eot = read_val_stream(folder)
    assert (
        len(json.loads((folder / "meta.json").read_text())["splits"]["val"]["shards"]) > 1
    )  # crosses shards
    val_docs = [
        tokenizer.decode(part[:-1].tolist())
        for part in np.split(stream, np.flatnonzero(stream == eot) + 1)[:-1]
    ]
    assert val_docs and set(val_docs) <= set(docs)  # decoding gives back the source documents

    score = score_prepared(model, tokenizer, folder, device=CPU, seq_len=32, batch_size=3)
    expected = hf_windows_nll(hf, [eot] + stream.tolist(), 32)
    assert score.tokens == len(stream)
    assert score.nll == pytest.approx(expected, rel=1e-5)
    n_bytes = sum(len(d.encode("utf-8")) for d in val_docs)
    assert n_bytes > sum(len(d) for d in val_docs)  # multi-byte characters are counted as bytes
    assert score.bytes == n_bytes
    assert score.bits_per_byte == pytest.approx(expected / (n_bytes * math.log(2)), rel=1e-5)

    # a cap keeps whole documents only; inside the first document the bytes are unknown, and said so
    ends = np.flatnonzero(stream == eot)
    capped = score_prepared(model, tokenizer, folder, device=CPU, seq_len=32, max_tokens=int(ends[2]) + 5)
    assert capped.tokens == ends[2] + 1
    assert capped.nll == pytest.approx(
        hf_windows_nll(hf, [eot] + stream[: ends[2] + 1].tolist(), 32), rel=1e-5
    )
    assert capped.bytes == sum(len(d.encode("utf-8")) for d in val_docs[:3])
    inside = score_prepared(model, tokenizer, folder, device=CPU, seq_len=32, max_tokens=int(ends[0]))
    assert inside.bits_per_byte is None and "inside a document" in inside.note
    assert inside.to_dict()["bits_per_byte"] is None


def test_prepared_data_of_another_tokenizer_is_refused(tmp_path):
    from lmforge.data.tokenizer import char_tokenizer
    from lmforge.infer.evaluate import score_prepared

    folder, _ = prepare_corpus(tmp_path, CHARS)
    other = char_tokenizer(CHARS[::-1])  # the same characters under other ids
    model = tiny_model(vocab_size=other.vocab_size, max_seq_len=32)
    with pytest.raises(
        DataError, match=r"prepared with tokenizer .* the model's tokenizer is .* Prepare the data"
    ):
        score_prepared(model, other, folder, device=CPU)


def test_eval_cli_scores_prepared_data(tmp_path, capsys):
    from lmforge.checkpoint import save_checkpoint
    from lmforge.cli import main
    from lmforge.config import Config
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.infer.evaluate import score_prepared

    folder, _ = prepare_corpus(tmp_path, CHARS)
    model = tiny_model(vocab_size=load_tokenizer(folder).vocab_size, max_seq_len=32)
    ckpt = save_checkpoint(
        tmp_path / "ckpt",
        model_state=model.state_dict(),
        config=Config(model=model.cfg),
        tokenizer_file=folder / "tokenizer.json",
    )
    out = tmp_path / "results.json"
    assert main(["eval", str(ckpt), "--data", str(folder), "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())["results"][f"{folder.name}/val"]
    expected = score_prepared(model, load_tokenizer(folder), folder, device=CPU, batch_size=16)
    assert result["loss"] == pytest.approx(expected.loss, rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-6)
    assert "bits_per_byte" in capsys.readouterr().out

    other, _ = prepare_corpus(tmp_path, CHARS[::-1], name="other")
    assert main(["eval", str(ckpt), "--data", str(other), "--device", "cpu"]) == 2
    assert "prepared with tokenizer" in capsys.readouterr().err
