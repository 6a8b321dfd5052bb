import io
import json

import numpy as np
import pytest
import torch

from lmforge.config import DataConfig
from lmforge.data.loader import TokenLoader, eval_batches
from lmforge.data.prepare import prepare_data
from lmforge.data.tokenizer import char_tokenizer
from lmforge.errors import DataError


def make_dataset(path, docs, tokenizer, shard_tokens=3000):
    src = path.parent / (path.name + ".jsonl")
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataConfig(tokenizer=str(tokenizer), val_fraction=0.2, shard_tokens=shard_tokens)
    prepare_data(cfg, [str(src)], path, progress=False)
    meta = json.loads((path / "meta.json").read_text())
    stream = {
        split: np.concatenate([np.fromfile(path / s["file"], dtype=meta["dtype"]) for s in info["shards"]])
        for split, info in meta["splits"].items()
    }
    return meta, stream


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghij "))
    docs_a = ["".join(rng.choice(letters, rng.integers(5, 200))) for _ in range(300)]
    docs_b = ["".join(rng.choice(np.array(list("XYZ\n")), rng.integers(5, 50))) for _ in range(300)]
    tokenizer = char_tokenizer("abcdefghij XYZ\n").save(root / "tokenizer.json")
    return {
        "a": (root / "a", *make_dataset(root / "a", docs_a, tokenizer)),
        "b": (root / "b", *make_dataset(root / "b", docs_b, tokenizer)),
    }


def windows_of(batches):
    return [tuple(row) for b in batches for row in torch.cat([b.inputs, b.targets[:, -1:]], 1).tolist()]


def test_windows_are_contiguous_slices_of_the_shards(datasets):
    path, meta, stream = datasets["a"]
    loader = TokenLoader([str(path)], seq_len=32, batch_size=8, seed=3, with_doc_ids=True)
    data = stream["train"]
    text = data.tobytes()
    n_windows = (len(data) - 1) // 32
    seen = set()
    for _ in range(20):
        batch = loader.next_batch()
        assert batch.inputs.shape == (8, 32) and batch.inputs.dtype == torch.int64
        assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
        for row, docs in zip(torch.cat([batch.inputs, batch.targets[:, -1:]], 1), batch.doc_ids):
            window = row.numpy().astype(data.dtype)
            start = text.find(window.tobytes()) // data.itemsize
            assert start >= 0 and np.array_equal(data[start : start + 33], window)
            seen.add(start)
            eots = (row[:-1] == meta["eot_id"]).numpy()
            assert np.array_equal(docs.numpy(), np.cumsum(eots) - eots)
    assert len(seen) == min(160, n_windows)  # no window twice within an epoch


def test_deterministic_and_epochs_reshuffle(datasets):
    path = str(datasets["a"][0])
    make = lambda seed: TokenLoader([path], seq_len=64, batch_size=4, seed=seed)  # noqa: E731
    first, again, other = make(1), make(1), make(2)
    a = [first.next_batch() for _ in range(10)]
    assert windows_of(a) == windows_of([again.next_batch() for _ in range(10)])
    assert windows_of(a) != windows_of([other.next_batch() for _ in range(10)])
    # batch_size=1: skipping one epoch's worth of windows lands exactly on the next epoch
    one = TokenLoader([path], seq_len=64, batch_size=1, seed=1)
    per_epoch = len(one._order(0)[1])
    epoch0 = windows_of([one.next_batch() for _ in range(per_epoch)])
    epoch1 = windows_of([one.next_batch() for _ in range(per_epoch)])
    assert one.epochs == [2] and len(set(epoch0)) == per_epoch
    assert epoch0[:10] != epoch1[:10]  # a new order (and a new offset) every epoch


def test_resume_equals_the_uninterrupted_stream(datasets):
    mix = {str(datasets["a"][0]): 2.0, str(datasets["b"][0]): 1.0}
    whole = TokenLoader(mix, seq_len=16, batch_size=4, seed=5, with_doc_ids=True)
    expected = [whole.next_batch() for _ in range(60)]
    first = TokenLoader(mix, seq_len=16, batch_size=4, seed=5, with_doc_ids=True)
    for _ in range(25):
        first.next_batch()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = TokenLoader(mix, seq_len=16, batch_size=4, seed=5, with_doc_ids=True)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for want in expected[25:]:
        got = resumed.next_batch()
        assert torch.equal(got.inputs, want.inputs) and torch.equal(got.doc_ids, want.doc_ids)
    skipped = TokenLoader(mix, seq_len=16, batch_size=4, seed=5)
    skipped.skip(40)
    assert torch.equal(skipped.next_batch().inputs, expected[40].inputs)
    with pytest.raises(DataError, match="seq_len: saved 16, now 32"):
        TokenLoader(mix, seq_len=32, batch_size=4, seed=5).load_state_dict(first.state_dict())


def test_two_ranks_are_disjoint_and_together_the_single_rank_stream(datasets):
    mix = {str(datasets["a"][0]): 1.0, str(datasets["b"][0]): 1.0}
    single = TokenLoader(mix, seq_len=16, batch_size=3, seed=9)
    ranks = [TokenLoader(mix, seq_len=16, batch_size=3, seed=9, rank=r, world_size=2) for r in range(2)]
    for _ in range(30):
        want = [single.next_batch(), single.next_batch()]
        got = [ranks[0].next_batch(), ranks[1].next_batch()]
        assert torch.equal(got[0].inputs, want[0].inputs) and torch.equal(got[1].inputs, want[1].inputs)
    w0, w1 = (
        set(windows_of([ranks[0].next_batch() for _ in range(5)])),
        set(windows_of([ranks[1].next_batch() for _ in range(5)])),
    )
    assert not w0 & w1


def test_mixture_weights_are_met_exactly(datasets):
    (pa, meta_a, _), (pb, meta_b, _) = datasets["a"], datasets["b"]
    loader = TokenLoader({str(pa): 3.0, str(pb): 1.0}, seq_len=8, batch_size=10, seed=0)
    for _ in range(40):
        loader.next_batch()
    assert loader.counts == [300, 100]
    natural = TokenLoader([str(pa), str(pb)], seq_len=8, batch_size=10, seed=0)
    share = meta_a["splits"]["train"]["tokens"] / (
        meta_a["splits"]["train"]["tokens"] + meta_b["splits"]["train"]["tokens"]
    )
    assert natural.weights[0] == pytest.approx(share)
    assert loader.vocab_size == meta_a["vocab_size"] and loader.tokenizer_path.endswith("tokenizer.json")


def test_eval_batches_are_a_fixed_pass(datasets):
    path, meta, stream = datasets["a"]
    val = stream["val"]
    full = list(eval_batches(path, seq_len=32, batch_size=5, max_batches=None))
    n_windows = (len(val) - 1) // 32
    assert sum(len(b.inputs) for b in full) == n_windows
    flat = torch.cat([b.inputs for b in full]).reshape(-1).numpy()
    assert np.array_equal(flat, val[: n_windows * 32])
    capped = list(eval_batches(path, seq_len=32, batch_size=5, max_batches=2))
    again = list(eval_batches(path, seq_len=32, batch_size=5, max_batches=2))
    assert len(capped) == 2 and all(torch.equal(x.inputs, y.inputs) for x, y in zip(capped, again))
    (short,) = eval_batches(path, seq_len=10**6, batch_size=1, max_batches=1)  # all of a too-short split
    assert short.inputs.shape == (1, len(val) - 1) and np.array_equal(short.inputs[0].numpy(), val[:-1])


def test_mixing_tokenizers_is_refused(datasets, tmp_path, bpe_path):
    src = tmp_path / "x.jsonl"
    src.write_text("".join(json.dumps({"text": f"some text number {i} " * 20}) + "\n" for i in range(50)))
    prepare_data(
        DataConfig(tokenizer=str(bpe_path), val_fraction=0.1), [str(src)], tmp_path / "x", progress=False
    )
    with pytest.raises(DataError, match="share one tokenizer"):
        TokenLoader([str(datasets["a"][0]), str(tmp_path / "x")], seq_len=8, batch_size=2, seed=0)


def test_a_split_of_exactly_one_window(datasets):
    path, _, stream = datasets["a"]
    val = stream["val"]
    loader = TokenLoader(str(path), split="val", seq_len=len(val) - 1, batch_size=2, seed=0)
    for _ in range(3):
        batch = loader.next_batch()
        assert np.array_equal(batch.inputs[1].numpy(), val[:-1]) and np.array_equal(
            batch.targets[0].numpy(), val[1:]
        )
    with pytest.raises(DataError, match="too few for one window"):
        TokenLoader(str(path), split="val", seq_len=len(val), batch_size=1, seed=0)
