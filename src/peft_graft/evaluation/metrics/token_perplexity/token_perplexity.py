"""Perplexity from per-text negative log-likelihoods and token counts (peft-graft local metric).

evaluate's hub `perplexity` loads a model by id; this one takes what any model gives, so it works offline for a base
model, a PeftModel with a pack, or a routed model: see peft_graft.evaluation.text_nll."""

import math

import datasets
import evaluate


class TokenPerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: summed negative log-likelihood (nats) per text; references: token counts",
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        tokens = sum(references)
        return {"perplexity": math.exp(sum(predictions) / tokens) if tokens else float("nan"), "tokens": tokens}
