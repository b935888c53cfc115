"""The demo's two SkillPacks behind ``peft-graft serve``, asked through the official ``openai`` client.

    make serve-demo                   # or: python examples/serve.py [--router FOLDER] [--port 8011]

1. The demo's skills (SmolLM2-135M-Instruct fine-tuned on arithmetic and on letter counting, cached) are packed at
   1/16 of their fp16 deltas with calibrated GPTQ, and a router is trained on 50 prompts per skill (skipped with
   ``--router``, e.g. the ``router`` folder that ``examples/demo.py --output DIR`` saved).
2. ``peft-graft serve ROUTER`` starts in its own process: an OpenAI-compatible server on a loopback port.
3. One held-out question of each skill goes to ``model="auto"``; the server routes it, answers with the chosen pack,
   and says which pack and with what router probability.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_graft import RoutedGraftModel, ServerProcess, extract_skillpack
from peft_graft._demo.bundled import bundled_model
from peft_graft._demo.recipes import ARITHMETIC, LETTER_COUNTING, finetuned_skill
from peft_graft.evaluation.tasks import SYSTEM_PROMPT, chat_prompt, chat_text

SKILLS = {"arithmetic": ARITHMETIC, "letters": LETTER_COUNTING}
ROUTER_EXAMPLES = 50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--router", help="serve this router folder instead of building the demo's")
    parser.add_argument("--port", type=int, default=8011)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    import openai

    splits = {name: recipe.split() for name, recipe in SKILLS.items()}
    router = Path(args.router) if args.router else _build_router(splits)

    print(f"2/3  peft-graft serve {router} --port {args.port}")
    with ServerProcess(str(router), port=args.port) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        print(f"     models: {', '.join(m.id for m in client.models.list())}")
        print("3/3  one held-out question of each skill, model='auto'")
        for name, recipe in SKILLS.items():
            example = splits[name][1][0]
            task = recipe.build_task()
            response = client.chat.completions.with_raw_response.create(
                model="auto",
                messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": example.question}],
                max_tokens=8,
                temperature=0,
            )
            answer = response.parse().choices[0].message.content
            pack, probability = response.headers["x-graft-pack"], float(response.headers["x-graft-route-probability"])
            verdict = "correct" if task.score(answer, example) else f"expected {example.answer}"
            print(f"     [{name}] {example.question!r}")
            print(f"       -> pack {pack} (router p={probability:.3f}), answer {answer!r} ({verdict})")


def _build_router(splits) -> Path:
    output = Path(tempfile.mkdtemp(prefix="graft-serve-demo-"))
    base_dir = bundled_model()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    print("1/3  SkillPacks at 1/16 of each fp16 delta (calibrated GPTQ) and a router")
    for name, recipe in SKILLS.items():
        calibration = [chat_text(tokenizer, e.question, e.answer) for e in splits[name][0][:64]]
        extract_skillpack(
            base_dir, finetuned_skill(recipe), output / name, budget=1 / 16, calibration=calibration, progress=False
        )
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    routed = RoutedGraftModel.from_packs(base, {name: output / name for name in SKILLS}, tokenizer)
    routed.fit_router(
        {name: [chat_prompt(tokenizer, e.question) for e in splits[name][0][:ROUTER_EXAMPLES]] for name in SKILLS}
    )
    routed.save_pretrained(output / "router")
    return output / "router"


if __name__ == "__main__":
    main()
