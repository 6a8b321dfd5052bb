"""Task specs, few-shot prompts, truncation and the eval verb: bad input named, prompts the same for every
model, the shipped specs read the shared sets, results carry metrics, config, fingerprint and samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import ConfigError, DataError
from lmforge.infer.suite import task_metrics
from lmforge.infer.tasks import TaskOptions, load_spec, resolve_task, run_task, shipped_specs
from lmforge.infer.tasks.runner import build_prompt, fewshot_examples, fit_prompt
from lmforge.infer.tasks.spec import read_items
from tests.conftest import require_shared_data

from .conftest import ByteTokenizer, tiny_model

CPU = torch.device("cpu")
SHIPPED = {
    "flores-zh-en", "flores-en-zh", "scitldr", "csl-title", "squad", "cmrc2018",
    "hellaswag", "arc-easy", "arc-challenge", "piqa", "lambada",
}  # fmt: skip


def write_task(folder: Path, records, spec_text: str, name: str = "task") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    spec = folder / f"{name}.yaml"
    spec.write_text(spec_text.replace("DATA", f"{name}.jsonl"), encoding="utf-8")
    return spec


QA_SPEC = """kind: qa
data: DATA
prompt: "Q: {q}\\nA:"
answer: " {a}"
references: a
document: q
stop: ["\\n"]
max_new_tokens: 4
"""
RECORDS = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(6)]


def test_shipped_specs_are_found_by_name_and_an_unknown_name_lists_them(tmp_path):
    assert set(shipped_specs()) == SHIPPED
    spec = resolve_task("flores-en-zh", tmp_path)
    assert spec.data == tmp_path / "eval" / "flores200_devtest_zh_en.jsonl"
    assert (spec.kind, spec.language, spec.references) == ("translation", "zh", "zh")
    with pytest.raises(ConfigError, match="unknown task 'flores'.*known tasks are arc-challenge, arc-easy"):
        resolve_task("flores", tmp_path)
    with pytest.raises(ConfigError, match="--data-dir"):
        resolve_task("squad", None)


def test_the_shipped_specs_read_every_record_of_the_shared_sets():
    root = require_shared_data("eval").parent
    for name in sorted(SHIPPED):
        spec = resolve_task(name, root)
        if spec.kind == "multiple_choice":
            assert spec.data.is_file(), name
            continue
        items = read_items(spec)
        assert len(items) >= 500, name
        assert all(item.references(spec) for item in items)


def test_a_user_spec_resolves_its_data_beside_itself_and_a_missing_field_names_file_line(tmp_path):
    spec_path = write_task(tmp_path / "mine", RECORDS[:2] + [{"q": "no answer"}], QA_SPEC)
    spec = resolve_task(str(spec_path))
    assert spec.data == tmp_path / "mine" / "task.jsonl" and spec.name == "task"
    with pytest.raises(DataError, match=r"task\.jsonl:3: no field 'a' for task 'task' \(found: q\)"):
        read_items(spec)


def test_an_invalid_spec_lists_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: essay\nprompt: 1\nmax_new_tokens: 0\ncolour: red\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_spec(bad)
    message = str(err.value)
    for part in ("unknown key 'colour'", "kind='essay' must be one of", "data:", "max_new_tokens=0"):
        assert part in message


def test_fewshot_examples_are_fixed_exclude_the_item_and_follow_the_harness_layout(tmp_path):
    spec = load_spec(write_task(tmp_path, RECORDS, QA_SPEC))
    items = read_items(spec)
    first = [fewshot_examples(i, 3, items, True, seed=1234) for i in range(6)]
    again = [fewshot_examples(i, 3, items, True, seed=1234) for i in range(6)]
    assert first == again  # the same prompts for every model and every run
    assert all(items[i] not in shots and len(set(map(id, shots))) == 3 for i, shots in enumerate(first))
    prompt = build_prompt(spec, items[0], first[0][:2], chat=False, render_chat=None)
    a, b = first[0][0].record, first[0][1].record
    assert prompt == f"Q: {a['q']}\nA: {a['a']}\n\nQ: {b['q']}\nA: {b['a']}\n\nQ: question 0\nA:"
    with pytest.raises(ConfigError, match="chat template"):
        build_prompt(spec, items[0], [], chat=True, render_chat=None)
    chat = build_prompt(spec, items[0], first[0][:1], chat=True, render_chat=lambda m: json.dumps(m))
    assert json.loads(chat) == [
        {"role": "user", "content": f"Q: {a['q']}\nA:"},
        {"role": "assistant", "content": a["a"]},
        {"role": "user", "content": "Q: question 0\nA:"},
    ]


def test_a_long_prompt_loses_the_start_of_its_document_only(tmp_path):
    spec = load_spec(write_task(tmp_path, RECORDS, QA_SPEC))
    tok = ByteTokenizer()
    item = read_items(spec)[0]
    long = type(item)({"q": "x" * 50 + "THE END", "a": "y"}, "here:1")
    text, ids, cut = fit_prompt(spec, long, lambda it: build_prompt(spec, it, [], False, None), tok, 20)
    assert (
        cut and len(ids) == 20 and text == "Q: " + ("x" * 50 + "THE END")[-14:] + "\nA:"
    )  # 20 - len("Q: \nA:")
    text, ids, cut = fit_prompt(spec, item, lambda it: build_prompt(spec, it, [], False, None), tok, 20)
    assert not cut and text == "Q: question 0\nA:"


def test_run_task_counts_cut_prompts_and_logs_every_item(tmp_path):
    spec = load_spec(write_task(tmp_path, RECORDS + [{"q": "z" * 200, "a": "answer"}], QA_SPEC))
    model = tiny_model(seed=3, max_seq_len=64)
    result = run_task(model, ByteTokenizer(), spec, TaskOptions(num_fewshot=1, batch_size=4), device=CPU)
    assert result.metrics["n"] == 7 and result.metrics["truncated"] >= 1
    assert set(result.metrics) >= {"exact_match", "exact_match_stderr", "f1", "f1_stderr"}
    sample = result.samples[6]
    assert sample["references"] == ["answer"] and set(sample["scores"]) == {"exact_match", "f1"}
    assert len(ByteTokenizer().encode(sample["prompt"])) <= 64 - 4
    assert "\n" not in sample["prediction"]  # cut at the stop string
    assert result.config["num_fewshot"] == 1 and result.config["fewshot"]["seed"] == 1234
    # the same items one at a time give the same greedy predictions as in batches
    alone = run_task(model, ByteTokenizer(), spec, TaskOptions(num_fewshot=1, batch_size=1), device=CPU)
    assert [s["prediction"] for s in alone.samples] == [s["prediction"] for s in result.samples]


def test_the_training_hook_takes_a_spec_path(tmp_path):
    spec = write_task(tmp_path, RECORDS, QA_SPEC)
    scores = task_metrics(tiny_model(seed=3), ByteTokenizer(), [spec], device=CPU, limit=3)
    assert set(scores) == {"task/exact_match", "task/f1"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import Config
    from lmforge.data.tokenizer import char_tokenizer

    root = tmp_path_factory.mktemp("tasks")
    tokenizer = char_tokenizer([chr(c) for c in range(32, 127)] + ["\n"])
    tok_file = tokenizer.save(root / "tok" / "tokenizer.json")
    model = tiny_model(vocab_size=tokenizer.vocab_size, max_seq_len=64)
    return save_checkpoint(
        root / "ckpt", model_state=model.state_dict(), config=Config(model=model.cfg), tokenizer_file=tok_file
    )


def test_eval_verb_writes_metrics_config_fingerprint_and_samples(checkpoint, tmp_path, capsys):
    spec = write_task(tmp_path, RECORDS, QA_SPEC)
    out = tmp_path / "results.json"
    code = main(["eval", str(checkpoint), "--task", str(spec), "--num-fewshot", "2", "--limit", "4",
                 "--out", str(out), "--device", "cpu"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "exact_match" in printed and "f1" in printed
    report = json.loads(out.read_text(encoding="utf-8"))
    from lmforge.infer.loading import load_for_inference
    from lmforge.infer.suite import model_fingerprint

    model = load_for_inference(checkpoint, device=CPU).model
    assert report["fingerprint"] == model_fingerprint(model) and len(report["fingerprint"]) == 71
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1e-3
    assert model_fingerprint(model) != report["fingerprint"]  # any change to a weight shows
    assert report["results"]["task"]["n"] == 4
    task = report["tasks"]["task"]
    assert task["config"]["num_fewshot"] == 2 and len(task["samples"]) == 4
    assert task["samples"][0]["prompt"].count("\n\nQ: ") == 2


def test_eval_verb_names_the_known_tasks_for_an_unknown_one(checkpoint, tmp_path, capsys):
    assert (
        main(["eval", str(checkpoint), "--task", "nope", "--data-dir", str(tmp_path), "--device", "cpu"]) == 2
    )
    assert "known tasks are arc-challenge" in capsys.readouterr().err


def test_eval_verb_names_a_record_without_a_field_before_loading(tmp_path, capsys):
    spec = write_task(tmp_path, RECORDS[:2] + [{"q": "no answer", "id": "x"}], QA_SPEC)
    code = main(["eval", str(tmp_path / "no_model_here"), "--task", str(spec), "--device", "cpu"])
    assert code == 2
    assert "task.jsonl:3: no field 'a' for task 'task' (found: id, q)" in capsys.readouterr().err


def test_multiple_choice_and_completion_specs_use_the_log_likelihood_scorer(tmp_path):
    from lmforge.infer.evaluate import evaluate_choice_task

    mc = [{"query": f"Question {i}?", "choices": ["yes", "no", "maybe"], "gold": i % 3} for i in range(5)]
    spec = write_task(tmp_path, mc, "kind: multiple_choice\ndata: DATA\n", name="mc")
    model, tok = tiny_model(seed=2, max_seq_len=64), ByteTokenizer()
    result = run_task(model, tok, load_spec(spec), device=CPU)
    assert result.metrics == evaluate_choice_task(model, tok, tmp_path / "mc.jsonl", device=CPU)
    assert len(result.samples) == 5 and len(result.samples[0]["loglikelihoods"]) == 3
    records = [{"context": "abc abc abc", "continuation": "abc"}, {"context": "xyz", "continuation": "q"}]
    spec = write_task(
        tmp_path, records, 'kind: completion\ndata: DATA\nprompt: "{context}"\nanswer: " {continuation}"\n'
        "references: continuation\n", name="lambada_like",
    )  # fmt: skip
    result = run_task(model, tok, load_spec(spec), device=CPU)
    assert result.metrics["n"] == 2 and result.metrics["tokens"] == 4 + 2  # " abc", " q" in bytes
    assert result.metrics["perplexity"] > 1 and result.metrics["acc"] in (0.0, 0.5, 1.0)


def test_chat_prompts_go_through_the_given_template_and_encoder(tmp_path):
    spec = load_spec(write_task(tmp_path, RECORDS, QA_SPEC))
    tok, encoded = ByteTokenizer(), []

    def render_chat(messages):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def encode_chat(text):
        encoded.append(text)
        return tok.encode(text)

    options = TaskOptions(chat=True, num_fewshot=1, limit=2)
    result = run_task(
        tiny_model(seed=3, max_seq_len=128),
        tok,
        spec,
        options,
        device=CPU,
        render_chat=render_chat,
        encode_chat=encode_chat,
    )
    assert result.samples[0]["prompt"].startswith("<user>Q: ") and result.samples[0]["prompt"].endswith(
        "<user>Q: question 0\nA:<assistant>"
    )
    assert encoded == [s["prompt"] for s in result.samples] and result.config["chat"] is True


def test_eval_verb_with_chat_renders_prompts_through_the_models_template(checkpoint, tmp_path):
    """`--chat` gives the task to the model through its chat template (the default one here), exactly as
    `lmforge chat` renders a conversation."""
    from lmforge.infer.chat import default_template
    from lmforge.infer.loading import load_for_inference

    spec = write_task(tmp_path, RECORDS, QA_SPEC)
    out = tmp_path / "results.json"
    code = main(["eval", str(checkpoint), "--task", str(spec), "--chat", "--limit", "2", "--num-fewshot", "0",
                 "--out", str(out), "--device", "cpu"])  # fmt: skip
    assert code == 0
    samples = json.loads(out.read_text(encoding="utf-8"))["tasks"]["task"]["samples"]
    template = default_template(load_for_inference(checkpoint, device=CPU).require_tokenizer())
    expected = template.render([{"role": "user", "content": "Q: question 0\nA:"}], add_generation_prompt=True)
    assert samples[0]["prompt"] == expected
