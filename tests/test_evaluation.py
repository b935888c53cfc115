"""The metrics shipped as local `evaluate` modules, the sandbox, and base / fine-tune / pack comparisons."""

from __future__ import annotations

import json
import os
import re
import time

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel, get_peft_model

from peft_graft import GraftConfig
from peft_graft.evaluation import compare, load_metric, perplexity, record_in_pack, retention
from peft_graft.evaluation.tasks import ReasoningTask
from peft_graft_cli import main as cli

from tiny_models import VOCAB, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TEXTS = ["the river runs past the stone", "a tiger sleeps under the lemon tree", "count 1 2 3 4 5"]


def test_reasoning_exact_match_uses_the_task_scorer():
    task = ReasoningTask("basic_arithmetic")
    examples = task.examples(6, seed=3)
    predictions = [e.answer if i % 2 == 0 else "no idea" for i, e in enumerate(examples)]
    predictions[0] += "\nand some explanation"  # only the first line is the answer
    references = [json.dumps({"task": task.name, "entry": e.entry}, default=str) for e in examples]
    result = load_metric("reasoning_exact_match").compute(predictions=predictions, references=references)
    assert result == {"exact_match": 0.5}


def test_code_runs_in_a_separate_limited_process(tmp_path):
    program = "def add(a, b):\n    return a + b\n"
    programs = {
        "passes": (program, "assert add(2, 3) == 5"),
        "fails": (program, "assert add(2, 3) == 6"),
        "loops": ("def add(a, b):\n    while True:\n        pass\n", "add(1, 2)"),
        "hogs memory": ("blob = bytearray(4 * 1024**3)\n", ""),
        "escapes": (
            "import os\nos.environ['GRAFT_SANDBOX'] = '1'\nopen('marker', 'w').write('x')\n",
            "raise SystemExit(3)",
        ),
    }
    cwd = os.getcwd()
    started = time.perf_counter()
    result = load_metric("code_pass_at_1").compute(
        predictions=[p for p, _ in programs.values()],
        references=[t for _, t in programs.values()],
        timeout=2.0,
        memory_mb=512,
    )
    assert time.perf_counter() - started < 30
    assert result["statuses"] == ["passed", "failed", "timeout", "failed", "failed"]
    assert result["pass@1"] == pytest.approx(0.2)
    assert "GRAFT_SANDBOX" not in os.environ and not os.path.exists(os.path.join(cwd, "marker"))


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    assert perplexity(model, tiny_tokenizer(), TEXTS) == pytest.approx(VOCAB, rel=1e-5)
    real = perplexity(tiny_llama(), tiny_tokenizer(), TEXTS)
    assert real != pytest.approx(VOCAB, rel=1e-3)


def test_retention():
    assert retention(0.35, 0.05, 0.35) == pytest.approx(1.0)
    assert retention(0.20, 0.05, 0.35) == pytest.approx(0.5)
    assert retention(0.3, 0.3, 0.3) is None


def test_compare_base_finetune_and_pack_and_record_in_the_card(tmp_path):
    base = tiny_llama()
    torch.manual_seed(4)
    trained = get_peft_model(base, GraftConfig(target_modules=["q_proj", "v_proj"], init_weights=False))
    trained.save_pretrained(tmp_path / "pack")
    pack = PeftModel.from_pretrained(tiny_llama(), tmp_path / "pack").eval()
    finetuned = PeftModel.from_pretrained(tiny_llama(), tmp_path / "pack").merge_and_unload().eval()
    tokenizer = tiny_tokenizer()
    comparison = compare({"base": tiny_llama(), "finetuned": finetuned, "pack": pack}, tokenizer, texts=TEXTS)
    assert comparison.scores["base"] != pytest.approx(comparison.scores["finetuned"], rel=1e-3)
    # the pack is its own merged fine-tune: the same perplexity; retention is for exact match only
    assert comparison.perplexities["pack"] == pytest.approx(comparison.perplexities["finetuned"], rel=1e-4)
    assert comparison.retention("pack") is None
    assert "| pack |" in comparison.table() and "retention" not in comparison.table()
    record_in_pack(tmp_path / "pack", comparison, "pack", "held-out text")
    card = ModelCard((tmp_path / "pack" / "README.md").read_text())
    metrics = {m["type"] for r in card.data.to_dict()["model-index"][0]["results"] for m in r["metrics"]}
    assert metrics == {"perplexity"}
    assert PeftModel.from_pretrained(tiny_llama(), tmp_path / "pack") is not None  # config still valid


def test_cli_eval_writes_the_table_and_json(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    torch.manual_seed(4)
    get_peft_model(tiny_llama(), GraftConfig(target_modules=["q_proj"], init_weights=False)).save_pretrained(
        tmp_path / "pack"
    )
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS))
    argv = ["eval", "--base", str(tmp_path / "base"), "--pack", str(tmp_path / "pack"), "--texts"]
    assert cli([*argv, str(tmp_path / "texts.txt"), "--output", str(tmp_path / "eval.json")]) == 0
    shown = capsys.readouterr().out
    assert "| pack |" in shown
    header = shown.splitlines()[0]  # texts only: one perplexity column, no retention (it is for exact match)
    assert header == "| model | perplexity (lower is better) |"
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert [row["model"] for row in rows] == ["base", "pack"]
    assert cli(["eval", "--base", str(tmp_path / "base")]) == 2

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(tmp_path / "base")
    options = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    argv = ["eval", "--base", str(tmp_path / "base"), "--pack", str(tmp_path / "pack"), "--task", "basic_arithmetic"]
    argv += ["--task-options", json.dumps(options), "--n", "3", "--exclude-train", "5", "--max-new-tokens", "2"]
    assert cli([*argv, "--output", str(tmp_path / "task.json")]) == 0
    report = json.loads((tmp_path / "task.json").read_text())
    assert report["task_options"] == options and len(report["questions"]) == 3
    training = set(e.question for e in ReasoningTask("basic_arithmetic", **options).examples(5, seed=0))
    assert not training & set(report["questions"])  # held out from the first 5 questions of the seed
    terms = [re.findall(r"\d+", q) for q in report["questions"]]
    assert all(len(t) == 2 and all(len(n) == 1 for n in t) for t in terms)  # the task options were applied
