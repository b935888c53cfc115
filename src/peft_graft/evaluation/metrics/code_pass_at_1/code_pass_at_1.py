"""pass@1 for HumanEval-style code: each program runs in its own subprocess with limits (peft-graft local metric)."""

import datasets
import evaluate

_DESCRIPTION = """Fraction of programs whose tests pass. A prediction is a complete program (prompt + completion);
its reference is the test code to append (e.g. HumanEval's `test` plus `check(entry_point)`). Every program runs in a
separate interpreter with a timeout and a memory limit (peft_graft.evaluation.sandbox), never in the evaluating
process."""


class CodePassAt1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description="predictions: programs; references: test code",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, timeout=10.0, memory_mb=1024):
        from peft_graft.evaluation.sandbox import run_python

        results = [
            run_python(program + "\n\n" + tests + "\n", timeout=timeout, memory_mb=memory_mb)
            for program, tests in zip(predictions, references, strict=True)
        ]
        return {
            "pass@1": sum(result.passed for result in results) / len(results) if results else 0.0,
            "statuses": [result.status for result in results],
        }
