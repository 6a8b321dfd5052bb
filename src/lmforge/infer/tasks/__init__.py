"""Tasks for ``lmforge eval --task``: generative tasks (summarization, translation, qa, classification) with
their reference metrics, and the log-likelihood tasks (multiple choice, completion), each a JSONL file plus
a YAML spec (``spec.py``); ``runner.py`` runs one on a model."""

from lmforge.infer.tasks.runner import run_task
from lmforge.infer.tasks.spec import TaskOptions, TaskResult, TaskSpec, load_spec, resolve_task, shipped_specs

__all__ = ["TaskOptions", "TaskResult", "TaskSpec", "load_spec", "resolve_task", "run_task", "shipped_specs"]
