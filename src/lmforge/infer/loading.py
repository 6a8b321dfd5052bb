"""Open a model for inference: an lmforge run or checkpoint folder, or a Hugging Face folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.checkpoint import TOKENIZER, load_model
from lmforge.config import Config
from lmforge.errors import DataError
from lmforge.infer.chat import (
    TOKENIZER_CONFIG,
    ChatSession,
    ChatTemplate,
    default_template,
    read_chat_template,
)
from lmforge.infer.fast import FastDecoder
from lmforge.infer.generate import SamplingConfig, TextGenerator, check_sampling
from lmforge.infer.quantize import check_quantize, quantize_model
from lmforge.model.transformer import Transformer, build_model


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object | None  # lmforge.data.tokenizer.Tokenizer, when the folder carries one
    config: Config
    directory: Path  # the checkpoint (or Hugging Face) folder the weights came from
    tokenizer_path: Path | None
    chat_template: ChatTemplate | None = None  # from tokenizer_config.json (or chat_template.jinja) beside it

    def require_tokenizer(self):
        if self.tokenizer is None:
            raise DataError(f"{self.directory}: no {TOKENIZER} beside the weights, so text cannot be encoded")
        return self.tokenizer


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "config.yaml").is_file()


def load_hf_folder(path: Path, *, device: torch.device) -> tuple[Transformer, Config]:
    """Build the lmforge model of a Hugging Face Llama or GPT-2 folder, in memory (nothing is written)."""
    from lmforge.convert import read_hf_folder

    config, state = read_hf_folder(path)
    model = build_model(config.model, device="meta")
    model.to_empty(device=device)
    model.tie_weights()
    model.load_state_dict(state, strict=False)
    model.init_buffers()
    return model, config


def load_for_inference(path: str | Path, *, device: torch.device, quantize: str | None = None) -> LoadedModel:
    """The model (in eval mode, on ``device``), its tokenizer and chat template from a run, checkpoint or HF
    folder. ``quantize`` ("int8", "int8-dynamic", "int4": ``infer.quantize``) replaces its projections by
    quantized ones (CPU)."""
    from lmforge.data.tokenizer import load_tokenizer

    check_quantize(quantize)
    path = Path(path)
    if path.is_dir() and is_hf_folder(path):
        model, config = load_hf_folder(path, device=device)
        directory = path
    else:
        model, config, directory = load_model(path, device=str(device))
    tokenizer_path = directory / TOKENIZER if (directory / TOKENIZER).is_file() else None
    tokenizer = (
        load_tokenizer(directory if is_hf_folder(directory) else tokenizer_path) if tokenizer_path else None
    )
    template = read_chat_template(directory)
    if quantize is not None:
        quantize_model(model, quantize)
    return LoadedModel(model.eval(), tokenizer, config, directory, tokenizer_path, template)


@dataclass(frozen=True)
class DecodeOptions:
    """How ``generate``, ``chat`` and ``eval`` decode: the fast step (``infer.fast``) or the eager reference,
    compiled or not, on float or weight-only quantized weights."""

    fast: bool = True
    compile: bool = False
    quantize: str | None = None  # "int8", "int8-dynamic", "int4" or None (float)

    def decoder(self, model: Transformer) -> FastDecoder | None:
        return FastDecoder(model, compile=self.compile) if self.fast else None


# -- opening a model for a use ----------------------------------------------------------------------------


def open_generator(
    model: str | Path,
    sampling: SamplingConfig,
    *,
    device: torch.device,
    use_cache: bool = True,
    decode: DecodeOptions = DecodeOptions(),
) -> TextGenerator:
    """Check ``sampling``, then open ``model`` (an lmforge run/checkpoint or a Hugging Face folder with a
    tokenizer) on ``device``."""
    check_sampling(sampling)  # before the weights are read
    loaded = load_for_inference(model, device=device, quantize=decode.quantize)
    tokenizer = loaded.require_tokenizer()
    decoder = decode.decoder(loaded.model)
    return TextGenerator(loaded.model, tokenizer, sampling, device, use_cache, decoder)


def open_chat(
    model: str | Path,
    sampling: SamplingConfig,
    *,
    device: torch.device,
    system: str | None = None,
    use_cache: bool = True,
    decode: DecodeOptions = DecodeOptions(),
) -> tuple[ChatSession, str | None]:
    """A chat session with ``model`` (an lmforge run/checkpoint or a Hugging Face folder) and a notice when
    the model carries no chat template (the default one is used then)."""
    check_sampling(sampling)  # before the weights are read
    loaded = load_for_inference(model, device=device, quantize=decode.quantize)
    tokenizer = loaded.require_tokenizer()
    template, notice = loaded.chat_template, None
    if template is None:
        template = default_template(tokenizer)
        notice = (
            f"{loaded.directory} has no chat template (no chat_template in {TOKENIZER_CONFIG}): using the "
            "default lmforge template; a model not fine-tuned on it may not follow it"
        )
    session = ChatSession(
        loaded.model,
        tokenizer,
        template,
        sampling,
        device,
        system=system,
        use_cache=use_cache,
        decoder=decode.decoder(loaded.model),
    )
    return session, notice
