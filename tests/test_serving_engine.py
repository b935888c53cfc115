"""The embedded serving engine on tiny models: continuous batching gives every request the tokens it gets alone."""

from __future__ import annotations

import threading

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_graft import BASE_ADAPTER, GenerationParameterError, GraftConfig, SamplingParams, ServerBusyError
from peft_graft.errors import UnknownModelError
from peft_graft.serving import FinishEvent, GenerationEngine, TokenEvent

from tiny_models import BUILDERS, LINEAR_TARGETS, tiny_tokenizer

PROMPTS = ["Calculate 12 + 7.", "Spell it backward: river", "How many legs?", "a", "Tell me a story about a tiger."]


def _packed_model(arch: str, tmp_path, names=("one", "two")):
    """`arch`'s tiny base with two random GRAFT packs loaded by name. Weights are drawn wider than the default
    (0.02) so that attention is sharp: positions and padding then change the tokens when they are wrong."""
    for seed, name in enumerate(names, start=1):
        base = BUILDERS[arch](initializer_range=0.3)
        torch.manual_seed(seed)
        get_peft_model(base, GraftConfig(target_modules=LINEAR_TARGETS[arch], init_weights=False, r=4)).save_pretrained(
            tmp_path / name
        )
    model = PeftModel.from_pretrained(BUILDERS[arch](initializer_range=0.3), tmp_path / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(tmp_path / name, adapter_name=name)
    return model.eval()


def _alone(model, tokenizer, prompt_ids: list[int], adapter: str, max_tokens: int, eos: frozenset) -> list[int]:
    """What `generate` gives this one prompt with its pack, greedy, ending at the same end tokens (the reference)."""
    with torch.no_grad():
        output = model.generate(
            input_ids=torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            adapter_names=[adapter],
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=sorted(eos),
        )
    return output[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_concurrent_greedy_requests_get_the_tokens_each_gets_alone(arch, tmp_path):
    model, tokenizer = _packed_model(arch, tmp_path), tiny_tokenizer()
    requests = [
        (tokenizer(prompt)["input_ids"], adapter, max_tokens)
        for prompt, adapter, max_tokens in zip(
            PROMPTS * 2, ["one", "two", BASE_ADAPTER, "two", "one"] * 2, [9, 4, 12, 7, 10, 3, 11, 6, 8, 5], strict=True
        )
    ]
    engine = GenerationEngine(model, tokenizer, max_batch=4, max_queue=16)
    expected = [_alone(model, tokenizer, ids, adapter, n, engine.eos_token_ids) for ids, adapter, n in requests]
    assert len({tuple(e) for e in expected}) > 5  # the packs and prompts really differ

    with engine:
        results: list[FinishEvent | None] = [None] * len(requests)
        done = threading.Barrier(len(requests) + 1)

        def run(index: int) -> None:
            ids, adapter, n = requests[index]
            results[index] = engine.generate(ids, adapter, SamplingParams(max_tokens=n, temperature=0))
            done.wait()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
        for thread in threads:  # 10 requests through 4 slots: later ones join a batch that is mid-decode
            thread.start()
        done.wait(timeout=120)
    for result, reference, (ids, _, n) in zip(results, expected, requests, strict=True):
        assert list(result.token_ids) == reference
        assert result.prompt_tokens == len(ids)
        eos = result.token_ids[-1] in engine.eos_token_ids
        assert result.finish_reason == ("stop" if eos else "length")
        assert len(result.token_ids) == n or eos


def test_a_request_joining_mid_decode_matches_it_alone_and_leaves_the_running_one_unchanged(tmp_path):
    model, tokenizer = _packed_model("llama", tmp_path), tiny_tokenizer()
    long_ids, short_ids = tokenizer(PROMPTS[0])["input_ids"], tokenizer(PROMPTS[3])["input_ids"]
    greedy = dict(temperature=0)
    with GenerationEngine(model, tokenizer, max_batch=8) as engine:
        alone_long = engine.generate(long_ids, "one", SamplingParams(max_tokens=24, **greedy)).token_ids
        alone_short = engine.generate(short_ids, "two", SamplingParams(max_tokens=6, **greedy)).token_ids
        events, started, finished = [], threading.Event(), threading.Event()

        def listen(event) -> None:
            events.append(event)
            if sum(isinstance(e, TokenEvent) for e in events) == 5:
                started.set()
            if isinstance(event, FinishEvent):
                finished.set()

        engine.submit(long_ids, "one", SamplingParams(max_tokens=24, **greedy), listen)
        assert started.wait(30)
        joined = engine.generate(short_ids, "two", SamplingParams(max_tokens=6, **greedy)).token_ids
        overlapped = not finished.is_set()  # the short one ran beside the long one, left-padded in its batch
        assert finished.wait(30)
    assert len(alone_long) == 24 and len(short_ids) < len(long_ids) and overlapped
    assert joined == alone_short
    assert events[-1].token_ids == alone_long
    assert "".join(e.text for e in events if isinstance(e, TokenEvent)) == events[-1].text


def test_seeded_sampling_is_the_same_alone_and_batched(tmp_path):
    model, tokenizer = _packed_model("qwen2", tmp_path), tiny_tokenizer()
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    params = [SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, top_k=40, seed=i) for i in range(len(ids))]
    with GenerationEngine(model, tokenizer, max_batch=1) as engine:
        alone = [engine.generate(p, "one", s).token_ids for p, s in zip(ids, params, strict=True)]
    with GenerationEngine(model, tokenizer, max_batch=8) as engine:
        box: dict[int, tuple] = {}
        threads = [
            threading.Thread(target=lambda i=i: box.__setitem__(i, engine.generate(ids[i], "one", params[i]).token_ids))
            for i in range(len(ids))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert [box[i] for i in range(len(ids))] == alone
    unseeded = SamplingParams(max_tokens=8, temperature=1.0)
    with GenerationEngine(model, tokenizer) as engine:
        draws = {engine.generate(ids[0], "one", unseeded).token_ids for _ in range(4)}
    assert len(draws) > 1  # sampling really samples


def test_stop_strings_end_the_text_before_them_and_the_stream_adds_up_to_it(tmp_path):
    model, tokenizer = _packed_model("llama", tmp_path), tiny_tokenizer()
    ids = tokenizer(PROMPTS[0])["input_ids"]
    with GenerationEngine(model, tokenizer) as engine:
        free = engine.generate(ids, "one", SamplingParams(max_tokens=20, temperature=0))
        stop = free.text[5:7]  # a stop string the free text contains
        events, finished = [], threading.Event()

        def listen(event) -> None:
            events.append(event)
            if isinstance(event, FinishEvent):
                finished.set()

        engine.submit(ids, "one", SamplingParams(max_tokens=20, temperature=0, stop=(stop, "@@never@@")), listen)
        assert finished.wait(30)
    final = events[-1]
    assert final.finish_reason == "stop"
    assert final.text == free.text[: free.text.index(stop)]
    assert "".join(e.text for e in events if isinstance(e, TokenEvent)) == final.text
    assert len(final.token_ids) < len(free.token_ids)


def test_a_cancelled_request_leaves_the_batch_and_the_others_finish_unchanged(tmp_path):
    model, tokenizer = _packed_model("llama", tmp_path), tiny_tokenizer()
    ids = tokenizer(PROMPTS[1])["input_ids"]
    greedy = SamplingParams(max_tokens=20, temperature=0)
    with GenerationEngine(model, tokenizer) as engine:
        alone = engine.generate(ids, "two", greedy).token_ids
        events, started = [], threading.Event()

        def listen(event) -> None:
            events.append(event)
            if len(events) == 3:
                started.set()

        long = SamplingParams(max_tokens=90, temperature=0)  # alone it runs all 90 tokens (no end of turn)
        handle = engine.submit(tokenizer(PROMPTS[0])["input_ids"], "one", long, listen)
        assert started.wait(30)
        handle.cancel()
        assert engine.generate(ids, "two", greedy).token_ids == alone
        assert engine.load == {"running": 0, "waiting": 0}
    assert not any(isinstance(e, FinishEvent) for e in events)
    assert len(events) < 90


def test_a_full_queue_refuses_and_bad_requests_are_refused_before_queueing(tmp_path):
    model, tokenizer = _packed_model("llama", tmp_path), tiny_tokenizer()
    ids = tokenizer(PROMPTS[0])["input_ids"]
    gate = threading.Event()
    with GenerationEngine(model, tokenizer, max_batch=1, max_queue=2) as engine:
        handles = [engine.submit(ids, "one", SamplingParams(max_tokens=60), lambda e: gate.wait(30))]
        while engine.load["running"] == 0:  # the first is running (and blocked in its listener)
            threading.Event().wait(0.01)
        handles += [engine.submit(ids, "one", SamplingParams(max_tokens=2), lambda e: None) for _ in range(2)]
        with pytest.raises(ServerBusyError, match="queue is full"):
            engine.submit(ids, "one", SamplingParams(max_tokens=2), lambda e: None)
        handles[1].cancel()  # a cancelled request frees its place in the queue at once
        handles.append(engine.submit(ids, "one", SamplingParams(max_tokens=2), lambda e: None))
        assert engine.load == {"running": 1, "waiting": 2}
        with pytest.raises(UnknownModelError, match="no pack named 'three'"):
            engine.submit(ids, "three", SamplingParams(), lambda e: None)
        with pytest.raises(GenerationParameterError, match="exceeds the model's context of 128"):
            engine.submit(ids, "one", SamplingParams(max_tokens=128), lambda e: None)
        with pytest.raises(GenerationParameterError, match="prompt is empty"):
            engine.submit([], "one", SamplingParams(), lambda e: None)
        for handle in handles:
            handle.cancel()
        gate.set()
    with pytest.raises(GenerationParameterError) as error:
        SamplingParams(temperature=3.0)
    assert error.value.field == "temperature"


def test_ignore_eos_runs_past_the_end_of_turn_to_max_tokens(tmp_path):
    model, tokenizer = _packed_model("llama", tmp_path), tiny_tokenizer()
    ids = tokenizer(PROMPTS[4])["input_ids"]
    with GenerationEngine(model, tokenizer) as engine:
        ended = engine.generate(ids, "one", SamplingParams(max_tokens=12, temperature=0))
        assert ended.finish_reason == "stop" and ended.token_ids[-1] in engine.eos_token_ids
        assert len(ended.token_ids) < 12
        running = engine.generate(ids, "one", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert running.finish_reason == "length" and len(running.token_ids) == 12
    assert running.token_ids[: len(ended.token_ids)] == ended.token_ids


def _byte_level_tokenizer():
    """One token per byte (a byte-level BPE without merges): characters beyond ASCII span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def _metaspace_tokenizer():
    """SentencePiece-style words ("▁word"): the decoder drops the first word's leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["▁the", "▁tiger", "▁sleeps", ".", "▁", "z", "z"]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="."))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.mark.parametrize("make_tokenizer", [_byte_level_tokenizer, _metaspace_tokenizer])
def test_incremental_decoding_adds_up_to_the_whole_decode_and_never_splits_a_character(make_tokenizer):
    from peft_graft.serving.engine import IncrementalDecoder

    tokenizer = make_tokenizer()
    if make_tokenizer is _byte_level_tokenizer:
        tokens = tokenizer("héllo 🐯 wörld, naïve ½", add_special_tokens=False)["input_ids"]
    else:
        tokens = [tokenizer.convert_tokens_to_ids(t) for t in ["▁the", "▁tiger", "▁sleeps", ".", "▁", "z", "z"]]
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.add(token) for token in tokens]
    whole = tokenizer.decode(tokens)
    assert "".join(pieces) == whole
    assert not any("\ufffd" in piece for piece in pieces)
    if make_tokenizer is _byte_level_tokenizer:
        assert whole == "héllo 🐯 wörld, naïve ½"
        assert pieces.count("") == len(tokens) - len(whole)  # a multi-byte character waits for its last byte
    else:
        assert whole == "the tiger sleeps. zz"
