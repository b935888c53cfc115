"""Fuzzing pack loading: mutated copies of a valid pack either load to exactly the original logits or raise a
GraftError, within a time and memory bound per case.

Two kinds of case:
- *damage* (flipped, cut or appended bytes anywhere in the weight file, the recorded hash kept), which the content
  hash must catch;
- *hostile* (one to three edits of the tensors, of the weight file's JSON header, or of ``adapter_config.json``,
  then the hash recorded again, as an author could): structure, types and non-finite values only, because a
  well-formed pack with other numbers in it is simply another pack.

CI runs ``PEFT_GRAFT_FUZZ_CASES`` cases (default 150, a fixed sequence); ``make fuzz`` runs 10,000 random ones and
writes the outcome counts to ``PEFT_GRAFT_FUZZ_REPORT``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peft_graft import GraftConfig, GraftError

from tiny_models import tiny_qwen2, token_batch

CASES = int(os.environ.get("PEFT_GRAFT_FUZZ_CASES", "150"))
REPORT = os.environ.get("PEFT_GRAFT_FUZZ_REPORT")
SECONDS_PER_CASE = 20
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
# what one case may allocate beyond the process at its start: the acceptance bound (4x the pack file plus the model)
# and a fixed allowance for the interpreter's own growth (malloc arenas, the forward's activations)
ALLOWANCE = 512 << 20

pytestmark = pytest.mark.filterwarnings("ignore")


class _Hang(Exception):
    pass


class _Failure(AssertionError):
    pass


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "pack"
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj", "embed_tokens", "input_layernorm"]  # biased low-rank, sparse tied, dense norm
    get_peft_model(tiny_qwen2(), GraftConfig(target_modules=targets, init_weights=False)).save_pretrained(folder)
    reference = _logits(folder)
    model_bytes = sum(p.numel() * p.element_size() for p in tiny_qwen2().parameters())
    return folder, reference, model_bytes


def _logits(folder: Path) -> torch.Tensor:
    model = PeftModel.from_pretrained(tiny_qwen2(), folder).eval()
    with torch.no_grad():
        return model(token_batch()).logits


# --- hostile values -------------------------------------------------------------------------------------------------

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2**31 - 1, 2**31, 2**63, 10**12]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["(a+)+$", "(.*.*)*x", "../../etc/passwd", "/tmp", "F16", "BF16", "I64", "lowrank", "x" * 5000]),
)
JSON_VALUES = st.recursive(
    _SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip
_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
]
_NON_FINITE = [float("nan"), float("inf"), float("-inf")]


def _mutate_tensors(data, tensors: dict[str, torch.Tensor], cast: set[str]) -> None:
    keys = sorted(tensors)
    key = data.draw(st.sampled_from(keys))
    tensor = tensors[key]
    kinds = ["drop", "cast", "reshape", "cut", "extend", "poison", "rename", "empty", "swap", "qmeta"]
    kind = data.draw(st.sampled_from(kinds))
    if kind == "drop":
        del tensors[key]
    elif kind == "cast" and key not in cast:  # cast back, a lossy round trip would be an edit of values
        cast.add(key)
        dtype = data.draw(st.sampled_from([d for d in _DTYPES if d != tensor.dtype]))
        tensors[key] = tensor.to(dtype)
    elif kind == "reshape" and tensor.numel():
        shape = data.draw(st.sampled_from([(-1,), (1, -1), (-1, 1), "transpose", (2, -1)]))
        if shape == "transpose":
            tensors[key] = tensor.reshape(tensor.shape[0], -1).T.contiguous() if tensor.dim() else tensor
        elif tensor.numel() % 2 == 0 or shape != (2, -1):
            tensors[key] = tensor.reshape(shape).contiguous()
    elif kind == "cut" and tensor.dim() and tensor.shape[0] > 0:
        tensors[key] = tensor[: data.draw(st.integers(0, tensor.shape[0] - 1))].contiguous()
    elif kind == "extend" and tensor.dim():
        tensors[key] = torch.cat([tensor, tensor[:1].repeat(data.draw(st.integers(1, 4)), *[1] * (tensor.dim() - 1))])
    elif kind == "poison" and tensor.is_floating_point() and tensor.numel():
        poisoned = tensor.clone().reshape(-1)
        poisoned[data.draw(st.integers(0, tensor.numel() - 1))] = data.draw(st.sampled_from(_NON_FINITE))
        tensors[key] = poisoned.reshape(tensor.shape)
    elif kind == "rename":
        renamed = data.draw(
            st.sampled_from(
                [
                    key.replace("graft_", "graft_X"),
                    key.replace(".b0", ".b7"),
                    key.replace("layers.0", "layers.9"),
                    key.replace("q_proj", "k_proj"),
                    key.replace("base_model.model.", ""),
                    key + ".weight",
                    key.rsplit(".", 1)[0] + ".weight",
                ]
            )
        )
        tensors[renamed] = tensors.pop(key)
    elif kind == "empty":
        tensors[key] = tensor.new_empty(0)
    elif kind == "qmeta" and key.endswith("_qmeta") and tensor.shape == (4,):
        # a band header's rows, length, bits or group_size: a huge group_size used to size an allocation
        edited = tensor.clone()
        edited[data.draw(st.integers(0, 3))] = data.draw(st.sampled_from([0, -1, 1, 3, 17, 2**31 - 1]))
        tensors[key] = edited
    elif kind == "swap":
        other_key = data.draw(st.sampled_from(keys))
        other = tensors[other_key]
        if (other.dtype, other.shape) != (tensor.dtype, tensor.shape):  # else it moves numbers: a value edit
            tensors[key], tensors[other_key] = other, tensor


def _mutate_header(data, header: dict) -> None:
    names = sorted(header)
    name = data.draw(st.sampled_from([*names, "__metadata__", "model.extra.graft_S"]))
    kind = data.draw(st.sampled_from(["field", "nudge", "entry", "drop_field", "offsets_of"]))
    entry = header.get(name)
    if kind == "entry" or not isinstance(entry, dict):
        header[name] = data.draw(JSON_VALUES)
    elif kind == "field":
        entry[data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = data.draw(JSON_VALUES)
    elif kind == "drop_field" and entry:
        del entry[data.draw(st.sampled_from(sorted(entry)))]
    elif kind == "nudge" and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list):
        values = entry[data.draw(st.sampled_from(["shape", "data_offsets"]))]
        if values:
            position = data.draw(st.integers(0, len(values) - 1))
            if isinstance(values[position], int):
                values[position] = data.draw(
                    st.sampled_from([values[position] + 1, values[position] - 1, values[position] * 2, 0, 2**40])
                )
    elif kind == "offsets_of":
        other = header.get(data.draw(st.sampled_from(names)))
        if isinstance(other, dict) and "data_offsets" in other:
            entry["data_offsets"] = other["data_offsets"]


def _mutate_config(data, config: dict) -> None:
    # peft_type stays: changed, the folder is not a GRAFT pack at all, and PEFT's own config classes take it
    key = data.draw(st.sampled_from([*sorted(set(config) - {"peft_type"}), "unknown_field"]))
    if data.draw(st.booleans()) and key in config:
        del config[key]
    else:
        config[key] = data.draw(JSON_VALUES)


# --- one case -------------------------------------------------------------------------------------------------------


def _read_header(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _write_header(file: Path, header: dict, body: bytes) -> None:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    file.write_bytes(len(encoded).to_bytes(8, "little") + encoded + body)


def _hostile(data, folder: Path) -> str:
    edits, cast = [], set()
    for _ in range(data.draw(st.integers(1, 3))):
        family = data.draw(st.sampled_from(["tensors", "header", "config"]))
        edits.append(family)
        if family == "tensors":
            try:
                tensors = load_file(folder / WEIGHTS)
            except SafetensorError:  # an earlier header edit broke the file: nothing left to edit as tensors
                continue
            _mutate_tensors(data, tensors, cast)
            save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
        elif family == "header":
            try:
                header, body = _read_header(folder / WEIGHTS)
            except ValueError:  # an earlier header edit made it a non-object
                continue
            if isinstance(header, dict):
                _mutate_header(data, header)
                _write_header(folder / WEIGHTS, header, body)
        else:
            config = json.loads((folder / CONFIG).read_text())
            _mutate_config(data, config)
            (folder / CONFIG).write_text(json.dumps(config))
    with contextlib.suppress(ValueError, TypeError, AttributeError):  # a config that is no longer an object
        config = json.loads((folder / CONFIG).read_text())
        config["weights_sha256"] = hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
        (folder / CONFIG).write_text(json.dumps(config))
    return "hostile " + "+".join(edits)


def _damage(data, folder: Path) -> str:
    raw = bytearray((folder / WEIGHTS).read_bytes())
    kind = data.draw(st.sampled_from(["flip", "cut", "append"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "cut":
        del raw[data.draw(st.integers(0, len(raw) - 1)) :]
    else:
        raw += bytes(data.draw(st.binary(min_size=1, max_size=64)))
    (folder / WEIGHTS).write_bytes(bytes(raw))
    return f"damage {kind}"


@contextlib.contextmanager
def _bounded(seconds: int, extra_bytes: int):
    """A wall-clock alarm and an address-space limit (Linux) around one case."""

    def alarm(signum, frame):
        raise _Hang(f"over {seconds} s")

    previous_handler = signal.signal(signal.SIGALRM, alarm)
    previous_limit = resource.getrlimit(resource.RLIMIT_AS)
    limited = False
    with contextlib.suppress(OSError, ValueError):
        pages = int(Path("/proc/self/statm").read_text().split()[0])
        resource.setrlimit(resource.RLIMIT_AS, (pages * os.sysconf("SC_PAGE_SIZE") + extra_bytes, previous_limit[1]))
        limited = True
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        if limited:
            resource.setrlimit(resource.RLIMIT_AS, previous_limit)
        signal.signal(signal.SIGALRM, previous_handler)


OUTCOMES: Counter[str] = Counter()


def _run_case(data, original) -> None:
    folder, reference, model_bytes = original
    with tempfile.TemporaryDirectory() as work:
        case = Path(work) / "pack"
        shutil.copytree(folder, case)
        label = _damage(data, case) if data.draw(st.integers(0, 3)) == 0 else _hostile(data, case)
        bound = 4 * (case / WEIGHTS).stat().st_size + model_bytes + ALLOWANCE
        try:
            with _bounded(SECONDS_PER_CASE, bound):
                logits = _logits(case)
        except GraftError as error:
            OUTCOMES[f"refused: {type(error).__name__}"] += 1
            return
        except _Hang as error:
            OUTCOMES["hang"] += 1
            raise _Failure(f"{label}: hung ({error})") from error
        except MemoryError as error:
            OUTCOMES["allocation"] += 1
            raise _Failure(f"{label}: allocated more than {bound} bytes") from error
        except Exception as error:
            kind = "allocation" if "allocate" in str(error) else "raw exception"
            OUTCOMES[kind] += 1
            raise _Failure(f"{label}: {kind} {type(error).__name__}: {error}") from error
        if logits.shape != reference.shape or not torch.equal(logits, reference):
            OUTCOMES["changed output"] += 1
            raise _Failure(f"{label}: loaded, but the logits changed")
        OUTCOMES["loaded identically"] += 1


@settings(
    max_examples=CASES,
    deadline=None,
    derandomize=REPORT is None,  # CI: the same cases every run
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_mutated_packs_load_identically_or_raise_a_graft_error(original, data):
    _run_case(data, original)


def test_report(original):
    """Runs after the fuzz test: every case was counted (and written out for ``make fuzz``)."""
    if not OUTCOMES:
        pytest.skip("the fuzz test did not run in this session")
    failures = sum(OUTCOMES[k] for k in ("hang", "allocation", "raw exception", "changed output"))
    if REPORT:
        Path(REPORT).write_text(json.dumps({"cases": sum(OUTCOMES.values()), **OUTCOMES}, indent=2) + "\n")
    assert failures == 0, dict(OUTCOMES)
    assert math.isclose(sum(OUTCOMES.values()), CASES, rel_tol=0.5)  # hypothesis ran about as many as asked


def test_the_bounds_catch_a_hang_and_an_allocation_bomb():
    """The fuzzer's own limits can fail: a case that allocates past its bound or outlives its time is caught."""
    if not Path("/proc/self/statm").exists():
        pytest.skip("the address-space limit needs Linux")
    with pytest.raises((MemoryError, RuntimeError)), _bounded(SECONDS_PER_CASE, 64 << 20):
        torch.zeros(1 << 28)  # 1 GiB
    with pytest.raises(_Hang), _bounded(1, 64 << 20):
        while True:
            pass
