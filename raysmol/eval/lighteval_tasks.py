"""LightEval glue. Runs only in the child process `raysmol.eval.cf.evaluate_suite` starts:

    python -m raysmol.eval.lighteval_tasks REQUEST.json

Importing LightEval's transformers model calls ``torch.set_grad_enabled(False)`` at import time, for the whole
process; a child process keeps that away from training code. The request names the model folder (a link named
after the weights' hash), a fresh cache folder, the batch size and the suite's tasks; the child writes
``{task: {score, stderr, details}}`` (or ``{"error": ...}`` for a row that does not fit its schema) to the
request's ``output`` path.
"""

from __future__ import annotations

import functools
import itertools
import json
import sys
from pathlib import Path
from typing import Any

from raysmol.eval.cf import METRIC, SuiteError, TaskSpec, char_norm_argmax


def task_config(task: TaskSpec):
    """A LightevalTaskConfig for one suite task: zero-shot, char-normalised log-likelihood accuracy."""
    from lighteval.metrics.dynamic_metrics import LogLikelihoodAccMetric
    from lighteval.metrics.normalizations import LogProbCharNorm
    from lighteval.tasks.lighteval_task import LightevalTaskConfig

    repo, subset = task.dataset()
    return LightevalTaskConfig(
        name=task.name,
        prompt_function=functools.partial(_to_doc, task),
        hf_repo=repo,
        hf_subset=subset,
        hf_avail_splits=[task.split],
        evaluation_splits=[task.split],
        few_shots_split=None,
        few_shots_select=None,
        # LogProbTokenNorm is broken with the transformers backend (DESIGN.md); characters are what the
        # SmolLM3 ablations normalise by anyway.
        metrics=[LogLikelihoodAccMetric(normalization=LogProbCharNorm())],
        version=0,
    )


def _to_doc(task: TaskSpec, line: dict, task_name: str):
    from lighteval.tasks.requests import Doc

    row = {k: v for k, v in line.items() if not k.startswith("__")}  # LightEval adds __index, __few_shots
    item = task.to_item(row, line["__index"])
    if item is None:  # unlabeled row: LightEval skips it
        return None
    return Doc(task_name=task_name, query=item.query, choices=item.choices, gold_index=item.gold_index)


def _register_only(configs: list) -> None:
    # Registry.load_all_task_configs imports every built-in task module, one of which calls the hub at import
    # time (and all of it takes seconds); this process only ever evaluates our tasks.
    from lighteval.tasks.registry import Registry

    table = {c.name: c for c in configs}
    Registry.load_all_task_configs = staticmethod(lambda custom_tasks=None, load_multilingual=False: dict(table))


def run(request: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the request's tasks; one LightEval pipeline per distinct max_samples (a pipeline-wide setting)."""
    tasks = [TaskSpec(**t) for t in request["tasks"]]
    _register_only([task_config(t) for t in tasks])
    results = {}
    by_samples = itertools.groupby(sorted(tasks, key=lambda t: t.max_samples or 0), key=lambda t: t.max_samples)
    for max_samples, group in by_samples:
        results.update(_run_pipeline(request, list(group), max_samples))
    return results


def _run_pipeline(request: dict, tasks: list[TaskSpec], max_samples: int | None) -> dict[str, Any]:
    from lighteval.logging.evaluation_tracker import EvaluationTracker
    from lighteval.models.transformers.transformers_model import TransformersModelConfig
    from lighteval.pipeline import ParallelismManager, Pipeline, PipelineParameters

    out = Path(request["cache_dir"])
    model_config = TransformersModelConfig(
        model_name=request["model"],
        batch_size=request["batch_size"],
        cache_dir=str(out),
        model_parallel=False,
        # CF scores a base model on raw text: a chat template in the tokenizer must not wrap the prompt.
        override_chat_template=False,
    )
    pipeline = Pipeline(
        tasks=",".join(f"{t.name}|0" for t in tasks),
        pipeline_parameters=PipelineParameters(launcher_type=ParallelismManager.NONE, max_samples=max_samples),
        evaluation_tracker=EvaluationTracker(output_dir=str(out / "tracker"), save_details=False),
        model_config=model_config,
    )
    pipeline.evaluate()
    aggregated = pipeline.evaluation_tracker.metrics_logger.metric_aggregated
    details = pipeline.get_details()
    return {t.name: {"score": float(aggregated[f"{t.name}|0"][METRIC]),
                     "stderr": float(aggregated[f"{t.name}|0"].get(f"{METRIC}_stderr", float("nan"))),
                     "details": [_sample(d) for d in details[f"{t.name}|0"]]}
            for t in tasks}


def _sample(detail) -> dict[str, Any]:
    doc, response = detail.doc, detail.model_response
    logprobs = [float(x) for x in response.logprobs[:len(doc.choices)]]
    return {"id": doc.id, "query": doc.query, "choices": list(doc.choices), "gold": doc.gold_index,
            "logprobs": logprobs, "prediction": char_norm_argmax(logprobs, doc.choices),
            "correct": int(detail.metric[METRIC])}


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text())
    output = Path(request["output"])
    try:
        result = run(request)
    except SuiteError as e:
        output.write_text(json.dumps({"error": str(e)}))
        return 2
    output.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
