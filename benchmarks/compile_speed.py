"""torch.compile on a model with one pack: graph breaks (``torch._dynamo.explain``) and the forward's latency, eager
against compiled (inductor), on SmolLM2-135M-Instruct with the demo's arithmetic pack at 1/16, in one process.

    python benchmarks/compile_speed.py            # about 3 min on 2 CPU cores (the compile itself is most of it)

Writes ``benchmarks/results/compile_speed.{json,md}``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_results

from peft_graft import extract_skillpack
from peft_graft._demo.bundled import bundled_model
from peft_graft._demo.recipes import ARITHMETIC, finetuned_skill
from peft_graft.evaluation.tasks import chat_prompt

ROUNDS = 20


def main() -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    warnings.filterwarnings("ignore")
    base_dir = bundled_model()
    work = Path(tempfile.mkdtemp(prefix="graft-bench-compile-"))
    extract_skillpack(base_dir, finetuned_skill(ARITHMETIC), work / "pack", budget=1 / 16, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), work / "pack"
    )
    model.eval()
    _, held_out = ARITHMETIC.split()
    ids = tokenizer([chat_prompt(tokenizer, held_out[0].question)], return_tensors="pt")["input_ids"]

    with torch.no_grad():
        explained = torch._dynamo.explain(model)(ids)
        torch._dynamo.reset()
        compiled = torch.compile(model)
        started = time.perf_counter()
        reference, first = model(ids).logits, compiled(ids).logits
        compile_seconds = time.perf_counter() - started
        error = float((first - reference).abs().max())
        eager_ms, compiled_ms = [], []
        for _ in range(ROUNDS):  # alternating, so that neither side gains from drift
            for run, times in ((model, eager_ms), (compiled, compiled_ms)):
                t0 = time.perf_counter()
                run(ids)
                times.append(1000 * (time.perf_counter() - t0))
    eager, fast = statistics.median(eager_ms), statistics.median(compiled_ms)
    payload = {
        "model": "SmolLM2-135M-Instruct (fp32), arithmetic pack at 1/16",
        "prompt_tokens": int(ids.shape[1]),
        "graph_breaks": explained.graph_break_count,
        "graphs": explained.graph_count,
        "compile_seconds": compile_seconds,
        "eager_forward_ms": eager,
        "compiled_forward_ms": fast,
        "speedup": eager / fast,
        "max_abs_logit_difference": error,
        "rounds": ROUNDS,
    }
    table = markdown_table(
        ["graph breaks", "eager forward (ms)", "compiled forward (ms)", "speed-up", "first call (s)", "max |Δlogit|"],
        [[explained.graph_break_count, f"{eager:.1f}", f"{fast:.1f}", f"{eager / fast:.2f}x",
          f"{compile_seconds:.0f}", f"{error:.1e}"]],
    )  # fmt: skip
    write_results("compile_speed", payload, table)
    print(table)


if __name__ == "__main__":
    main()
