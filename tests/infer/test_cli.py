"""The generate and eval verbs on bad input: clear messages naming the prompt or file:line, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.cli import main
from lmforge.config import Config
from lmforge.errors import DataError
from lmforge.infer.generate import SamplingConfig, generate, read_prompts
from tests.conftest import require_transformers

from .conftest import tiny_model

CPU = ["--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random 2-layer model with a 32-token context and a char tokenizer over printable ASCII."""
    from lmforge.data.tokenizer import char_tokenizer

    root = tmp_path_factory.mktemp("cli")
    tokenizer = char_tokenizer([chr(c) for c in range(32, 127)] + ["\n"])
    tok_file = tokenizer.save(root / "tok" / "tokenizer.json")
    model = tiny_model(vocab_size=tokenizer.vocab_size, max_seq_len=32)
    return save_checkpoint(
        root / "ckpt", model_state=model.state_dict(), config=Config(model=model.cfg), tokenizer_file=tok_file
    )


def test_generate_greedy_json_equals_the_library(checkpoint, capsys):
    from lmforge.infer.loading import load_for_inference

    assert main(["generate", str(checkpoint), "--prompt", "to be", "--temperature", "0", "--max-new-tokens", "6",
                 "--json", *CPU]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    loaded = load_for_inference(checkpoint, device=torch.device("cpu"))
    expected = generate(
        loaded.model,
        loaded.tokenizer,
        ["to be"],
        SamplingConfig(max_new_tokens=6, temperature=0),
        device=torch.device("cpu"),
    )[0]
    assert printed == {"prompt": "to be", "text": expected.text, "tokens": 6, "finish_reason": "length"}


def test_a_hugging_face_folder_generates_and_scores_like_its_checkpoint(checkpoint, tmp_path, capsys):
    require_transformers()
    from lmforge.convert import export_model

    export_model(checkpoint, tmp_path / "hf", verify=False)  # config.json + safetensors + tokenizer
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be, that is the question\n" * 3, encoding="utf-8")
    results = []
    for model in (checkpoint, tmp_path / "hf"):
        greedy = ["--prompt", "to be", "--temperature", "0", "--max-new-tokens", "8", "--json"]
        assert main(["generate", str(model), *greedy, *CPU]) == 0
        generated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        scoring = ["--text", str(text), "--seq-len", "32", "--out", str(tmp_path / "e.json")]
        assert main(["eval", str(model), *scoring, *CPU]) == 0
        capsys.readouterr()
        results.append((generated, json.loads((tmp_path / "e.json").read_text())))
    (lm_text, lm_eval), (hf_text, hf_eval) = results
    assert hf_text == lm_text and hf_text["tokens"] == 8
    assert "perplexity" in json.dumps(lm_eval)  # the scores themselves are compared, not an empty file
    assert json.dumps(hf_eval, sort_keys=True).replace(str(tmp_path / "hf"), "M") == json.dumps(
        lm_eval, sort_keys=True
    ).replace(str(checkpoint), "M")


def test_generate_rejects_empty_and_too_long_prompts(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--prompt", "", *CPU]) == 2
    assert "prompt 0 is empty" in capsys.readouterr().err
    assert main(["generate", str(checkpoint), "--prompt", "ok", "--prompt", "x" * 40, *CPU]) == 2
    err = capsys.readouterr().err
    assert "prompt 1 is 40 tokens, but the model's context is 32 tokens" in err and "at most 31" in err


def test_interactive_generation_survives_a_too_long_prompt(checkpoint, capsys, monkeypatch):
    lines = iter(["x" * 40, "hi"])

    def fake_input(_prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    args = [
        "generate",
        str(checkpoint),
        "--interactive",
        "--temperature",
        "0",
        "--max-new-tokens",
        "3",
        "--json",
    ]
    assert main([*args, *CPU]) == 0
    captured = capsys.readouterr()
    assert "prompt 0 is 40 tokens" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["prompt"] == "hi"


def test_prompts_file_problems_name_file_and_line(tmp_path, checkpoint, capsys):
    good = tmp_path / "prompts.txt"
    good.write_text("first\n\nsecond\\nline\n", encoding="utf-8")
    assert read_prompts(good) == ["first", "second\nline"]
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"prompts.jsonl:2: no string field 'prompt' \(found: text\)"):
        read_prompts(bad)
    bad.write_text(json.dumps({"prompt": "a"}) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"prompts.jsonl:2: not valid JSON"):
        read_prompts(bad)
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.txt: no prompts"):
        read_prompts(tmp_path / "empty.txt")
    assert main(["generate", str(checkpoint), "--prompts-file", str(bad), *CPU]) == 2
    assert "prompts.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_eval_bad_input_writes_nothing(tmp_path, checkpoint, capsys):
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be\n", encoding="utf-8")
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0}) + "\n"
                    + json.dumps({"query": "q", "choices": ["a", "b"]}) + "\n", encoding="utf-8")  # fmt: skip
    out = tmp_path / "results.json"
    assert (
        main(["eval", str(checkpoint), "--text", str(text), "--task", str(task), "--out", str(out), *CPU])
        == 2
    )
    assert "task.jsonl:2: multiple-choice record without gold" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("results.json*"))
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    assert main(["eval", str(checkpoint), "--text", str(empty), "--out", str(out), *CPU]) == 2
    assert "cannot score an empty text" in capsys.readouterr().err and not out.exists()
    assert main(["eval", str(checkpoint), "--data", str(tmp_path), *CPU]) == 2
    assert "not a prepared dataset" in capsys.readouterr().err


def test_evaluate_model_equals_a_direct_computation(checkpoint, tmp_path):
    import math

    from lmforge.infer.loading import load_for_inference
    from lmforge.infer.suite import evaluate_model

    text = tmp_path / "text.txt"
    text.write_text("to be or not to be", encoding="utf-8")  # 18 tokens: one window of the 32-token context
    items = [("the cat sat on the", ["mat", "moon"], 0), ("two plus two is", ["four", "fish", "five"], 2)]
    task = tmp_path / "quiz_val.jsonl"
    task.write_text("".join(json.dumps({"query": q, "choices": c, "gold": g}) + "\n" for q, c, g in items))
    report = evaluate_model(checkpoint, texts=[text], tasks=[task], device=torch.device("cpu"))
    assert (
        report.model == str(checkpoint) and report.notes == [] and set(report.results) == {"text.txt", "quiz"}
    )

    loaded = load_for_inference(checkpoint, device=torch.device("cpu"))
    model, tok = loaded.model.eval(), loaded.tokenizer
    ids = torch.tensor([[tok.eot_id, *tok.encode(text.read_text())]])  # scored as a new document
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:], reduction="sum").item()
    scored = report.results["text.txt"]
    assert scored["tokens"] == 18 and scored["bytes"] == 18
    assert scored["loss"] == pytest.approx(nll / 18, rel=1e-5)
    assert scored["bits_per_byte"] == pytest.approx(nll / (18 * math.log(2)), rel=1e-5)

    def summed_logprob(context: str, ending: str) -> float:  # the ending's tokens after the context
        ctx, cont = tok.encode(context), tok.encode(" " + ending)
        full = torch.tensor([ctx + cont])
        with torch.no_grad():
            logprobs = model(full[:, :-1])[0].log_softmax(-1)
        return sum(logprobs[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))

    hits = []
    for context, choices, gold in items:
        scores = [summed_logprob(context, c) for c in choices]
        hits.append(scores.index(max(scores)) == gold)
    assert report.results["quiz"]["acc"] == sum(hits) / len(hits) and report.results["quiz"]["n"] == 2


def test_evaluate_model_checks_its_inputs_before_loading(tmp_path):
    from lmforge.infer.suite import evaluate_model

    no_model = str(tmp_path / "no-model")  # never opened: the inputs are refused first
    with pytest.raises(DataError, match="nothing to evaluate"):
        evaluate_model(no_model, device=torch.device("cpu"))
    with pytest.raises(DataError, match="missing.txt: no such file"):
        evaluate_model(no_model, texts=[tmp_path / "missing.txt"], device=torch.device("cpu"))


def test_open_generator_continues_like_a_greedy_loop_and_checks_sampling_first(checkpoint, tmp_path):
    from lmforge.errors import ConfigError
    from lmforge.infer.loading import load_for_inference, open_generator

    with pytest.raises(ConfigError):  # a bad sampling setup is refused before any weights are read
        open_generator(tmp_path / "no-model", SamplingConfig(top_p=0.0), device=torch.device("cpu"))
    sampling = SamplingConfig(max_new_tokens=5, temperature=0)
    generator = open_generator(checkpoint, sampling, device=torch.device("cpu"))
    (result,) = generator(["to be"])

    loaded = load_for_inference(checkpoint, device=torch.device("cpu"))
    ids = loaded.tokenizer.encode("to be")
    with torch.no_grad():
        for _ in range(5):  # the reference: argmax of a full forward pass, no cache
            ids.append(int(loaded.model.eval()(torch.tensor([ids]))[0, -1].argmax()))
    expected = loaded.tokenizer.decode(ids[-5:])
    assert result.to_dict() == {"prompt": "to be", "text": expected, "tokens": 5, "finish_reason": "length"}


def test_eval_max_new_tokens_sets_a_shipped_tasks_generation_length(checkpoint, tmp_path, capsys):
    # squad ships with max_new_tokens: 32, the whole context of this 32-token model: without the option it
    # cannot run here at all; with it, every prediction is the greedy continuation of that many tokens.
    from lmforge.infer.loading import load_for_inference

    (tmp_path / "eval").mkdir()
    records = [
        {"title": "T", "context": f"ctx {i}", "question": f"q{i}?", "answers": [f"a{i}"]} for i in range(4)
    ]
    (tmp_path / "eval" / "squad_v1.1_dev_500.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records)
    )
    argv = ["eval", str(checkpoint), "--task", "squad", "--data-dir", str(tmp_path), *CPU]
    assert main(argv) == 2
    assert "max_new_tokens=32 leaves no room for a prompt" in capsys.readouterr().err
    assert main([*argv, "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens 0: must be at least 1" in capsys.readouterr().err
    out = tmp_path / "results.json"
    assert main([*argv, "--max-new-tokens", "5", "--out", str(out)]) == 0
    task = json.loads(out.read_text())["tasks"]["squad"]
    assert task["config"]["max_new_tokens"] == 5
    loaded = load_for_inference(checkpoint, device=torch.device("cpu"))
    tok = loaded.tokenizer

    def greedy(
        ids: list[int], steps: int
    ) -> str:  # a plain greedy loop, cut at end-of-text and the stop "\n"
        new = []
        with torch.no_grad():
            for _ in range(steps):
                new.append(int(loaded.model(torch.tensor([ids + new]))[0, -1].argmax()))
        if tok.eot_id in new:
            new = new[: new.index(tok.eot_id)]
        return tok.decode(new).split("\n")[0]

    prompts = [tok.encode(sample["prompt"]) for sample in task["samples"]]
    assert [s["prediction"] for s in task["samples"]] == [greedy(ids, 5) for ids in prompts]
    assert [s["prediction"] for s in task["samples"]] != [greedy(ids, 6) for ids in prompts]  # 5 did cut


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_generate_fast_and_eager_print_the_same_text(checkpoint, capsys, quantize):
    """`--decode fast` (the default) and `--decode eager`, float or `--quantize int8`: the same greedy text;
    the quantized text is the library's on a model quantized the same way."""
    from lmforge.infer.loading import load_for_inference

    args = ["generate", str(checkpoint), "--prompt", "to be", "--temperature", "0", "--max-new-tokens", "8",
            "--json", *CPU, *(["--quantize", quantize] if quantize else [])]  # fmt: skip
    texts = []
    for decode in ("fast", "eager"):
        assert main([*args, "--decode", decode]) == 0
        texts.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"])
    loaded = load_for_inference(checkpoint, device=torch.device("cpu"), quantize=quantize)
    expected = generate(
        loaded.model, loaded.tokenizer, ["to be"], SamplingConfig(max_new_tokens=8, temperature=0),
        device=torch.device("cpu"),
    )[0]  # fmt: skip
    assert texts == [expected.text, expected.text]


def test_an_unknown_quantize_mode_is_refused_before_loading(checkpoint):
    from lmforge.errors import ConfigError
    from lmforge.infer.loading import load_for_inference

    with pytest.raises(ConfigError, match="int3"):
        load_for_inference(checkpoint / "missing", device=torch.device("cpu"), quantize="int3")
