"""A real server on 127.0.0.1 (port 0, so tests never race for ports) over a tiny random checkpoint."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.config import Config, ModelConfig
from lmforge.model.transformer import build_model
from tests.conftest import require_module

require_module("fastapi", "serve")


def ascii_tokenizer():
    """One token per printable ASCII character, with no byte fallback: every token decodes to the same text
    alone or in a sequence, so streamed text equals the whole text exactly (a random model emits any
    token)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    from lmforge.data.tokenizer import SPECIAL_TOKENS, Tokenizer, _special

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for c in [chr(c) for c in range(32, 127)] + ["\n"]:
        vocab[c] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens([_special(t) for t in SPECIAL_TOKENS])
    return Tokenizer(hf)


def tiny_config(vocab_size: int, max_seq_len: int = 256) -> ModelConfig:
    """The served test model: 2 layers, GQA, untied head, weights large enough for varied greedy tokens."""
    return ModelConfig(
        vocab_size=vocab_size,
        max_seq_len=max_seq_len,
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=128,
        tie_embeddings=False,
        init_std=0.2,
    )


def tiny_checkpoint(folder: Path, max_seq_len: int = 256) -> Path:
    """A random 2-layer GQA model with an ASCII tokenizer, saved as a checkpoint."""
    tokenizer = ascii_tokenizer()
    tok_file = tokenizer.save(folder / "tok" / "tokenizer.json")
    cfg = tiny_config(tokenizer.vocab_size, max_seq_len)
    model = build_model(cfg, seed=0)
    return save_checkpoint(
        folder / "tiny", model_state=model.state_dict(), config=Config(model=cfg), tokenizer_file=tok_file
    )


class RunningServer:
    def __init__(self, checkpoint: Path, **settings):
        from lmforge.serve.app import ServeConfig, open_server

        torch.manual_seed(0)
        self.cfg = ServeConfig(port=0, model_name="tiny", **settings)
        self.server, sock, self.url = open_server(
            checkpoint, self.cfg, device=torch.device("cpu"), on_notice=lambda text: None
        )
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    @property
    def scheduler(self):
        return self.server.config.app.state.scheduler

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="package")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="package")
def server(checkpoint):
    running = RunningServer(checkpoint, max_batch=8, max_queue=32)
    yield running
    running.close()
