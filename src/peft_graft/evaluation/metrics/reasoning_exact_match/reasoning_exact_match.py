"""Exact match of final answers on reasoning-gym tasks, scored by each task's own scorer (peft-graft local metric)."""

import json

import datasets
import evaluate

_DESCRIPTION = """Mean reasoning-gym score of model answers. Each reference is the JSON of
{"task": name, "entry": reasoning-gym entry, "options": dataset options}; the answer is the prediction's first line."""


class ReasoningExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description="predictions: model completions; references: JSON task entries",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        from peft_graft.evaluation.tasks import Example, ReasoningTask

        tasks = {}
        scores = []
        for prediction, reference in zip(predictions, references, strict=True):
            item = json.loads(reference)
            key = json.dumps([item["task"], item.get("options", {})], sort_keys=True)
            if key not in tasks:
                tasks[key] = ReasoningTask(item["task"], **item.get("options", {}))
            entry = item["entry"]
            scores.append(tasks[key].score(prediction, Example(entry["question"], str(entry["answer"]), entry)))
        return {"exact_match": sum(scores) / len(scores) if scores else 0.0}
