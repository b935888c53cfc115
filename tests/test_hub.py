"""Packs and routers through the Hub API, against the session's loopback server (tests/hub_server.py), with the real
huggingface_hub client: push, pull, revisions, cards, typed errors, damaged downloads, pickle refusal."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from peft import PeftModel, get_peft_model

from peft_graft import GraftConfig, RoutedGraftModel, RoutingError
from peft_graft.errors import HubError, PackFormatError, UnsafePackError
from peft_graft.hub import check_pack_folder, pull_pack, push_pack
from peft_graft_cli import main as cli

from tiny_models import tiny_llama, tiny_tokenizer, token_batch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TESTS = Path(__file__).parent


def _repo(name: str) -> str:
    return f"org/{name}-{uuid.uuid4().hex[:8]}"


def _pack(folder: Path, seed: int = 1, targets=("q_proj", "v_proj", "down_proj", "embed_tokens")) -> Path:
    base = tiny_llama()  # seeds itself, so seed the adapter's random init afterwards
    torch.manual_seed(seed)
    model = get_peft_model(base, GraftConfig(target_modules=list(targets), init_weights=False, r=4))
    model.save_pretrained(folder)
    return folder


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(token_batch()).logits


def test_pushed_pack_pulled_in_a_fresh_process_gives_identical_logits(tmp_path, hub):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    local = _pack(tmp_path / "pack")
    repo = _repo("pack")
    loaded = PeftModel.from_pretrained(tiny_llama(), local).eval()
    loaded.push_to_hub(repo)  # PEFT's verb, through peft-graft's card-writing push
    expected = _logits(loaded)

    script = textwrap.dedent(
        f"""
        import torch, peft_graft
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r})
        model = PeftModel.from_pretrained(base, {repo!r}).eval()
        generator = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, 128, (3, 12), generator=generator)
        with torch.no_grad():
            torch.save(model(tokens).logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "fresh-cache")}  # the fresh process downloads for itself
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_revisions_and_tags_are_honoured(tmp_path, hub):
    repo = _repo("revisions")
    first = push_pack(_pack(tmp_path / "v1", seed=1), repo, tag="v1")
    push_pack(_pack(tmp_path / "v2", seed=2), repo, tag="v2")
    by_tag = PeftModel.from_pretrained(tiny_llama(), repo, revision="v1").eval()
    by_commit = PeftModel.from_pretrained(tiny_llama(), repo, revision=first).eval()
    latest = PeftModel.from_pretrained(tiny_llama(), repo).eval()
    v1 = PeftModel.from_pretrained(tiny_llama(), tmp_path / "v1").eval()
    v2 = PeftModel.from_pretrained(tiny_llama(), tmp_path / "v2").eval()
    assert torch.equal(_logits(by_tag), _logits(v1))
    assert torch.equal(_logits(by_commit), _logits(v1))
    assert torch.equal(_logits(latest), _logits(v2))
    assert not torch.equal(_logits(v1), _logits(v2))
    # a branch other than main
    push_pack(_pack(tmp_path / "dev", seed=3), repo, revision="dev")
    on_branch = PeftModel.from_pretrained(tiny_llama(), repo, revision="dev").eval()
    dev = PeftModel.from_pretrained(tiny_llama(), tmp_path / "dev").eval()
    assert torch.equal(_logits(on_branch), _logits(dev))
    assert torch.equal(_logits(PeftModel.from_pretrained(tiny_llama(), repo).eval()), _logits(v2))


def test_pushed_card_is_valid_yaml_with_the_load_snippet(tmp_path, hub):
    repo = _repo("card")
    folder = _pack(tmp_path / "pack")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    config["pack_info"] = {
        "skill": "basic arithmetic",
        "license": "apache-2.0",
        "eval_results": [{"task": "basic_arithmetic", "metric": "accuracy", "value": 0.354}],
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    push_pack(folder, repo)

    text = Path(hf_hub_download(repo, "README.md")).read_text()
    card = ModelCard(text)
    assert ModelCard(str(card)).data.to_dict() == card.data.to_dict()  # round-trips
    data = card.data.to_dict()
    assert data["library_name"] == "peft"
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"peft", "graft", "skillpack"} <= set(data["tags"])
    assert data["pipeline_tag"] == "text-generation"
    assert data["license"] == "apache-2.0"
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.354
    assert f'model = PeftModel.from_pretrained(base, "{repo}")' in text
    assert "import peft_graft" in text
    assert config["base_model_fingerprint"] in text
    for role in ("low-rank", "sparse"):
        assert f"| {role} |" in text  # per-form size table (no extraction report for a trained pack)


def test_router_with_local_and_hub_packs_round_trips_through_the_hub(tmp_path, hub):
    hub_pack = _repo("spell-pack")
    push_pack(_pack(tmp_path / "spell", seed=2, targets=("k_proj", "up_proj")), hub_pack, tag="v1")
    packs = {"math": _pack(tmp_path / "math", seed=1), "spell": hub_pack}
    tokenizer = tiny_tokenizer()
    routed = RoutedGraftModel.from_packs(tiny_llama(), packs, tokenizer)
    prompts = {"math": ["1+1", "2*3", "4-2", "9+9"], "spell": ["apple", "river", "stone", "cloud"]}
    routed.fit_router(prompts)
    router_repo = _repo("router")
    routed.push_to_hub(router_repo)

    pulled = RoutedGraftModel.from_pretrained(tiny_llama(), router_repo, tokenizer)
    queries = ["3+4", "lemon", "7*7", "tiger"]
    assert pulled.route(queries) == routed.route(queries)
    tokenizer.padding_side = "left"
    batch = tokenizer(queries, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(pulled(**batch).logits, routed(**batch).logits)
    config = json.loads(Path(hf_hub_download(router_repo, "router_config.json")).read_text())
    assert config["packs"]["math"] == {"path": "packs/math"}  # stored with the router
    assert config["packs"]["spell"]["repo_id"] == hub_pack  # a reference, pinned to the commit it was pulled at
    assert len(config["packs"]["spell"]["commit"]) == 40
    card = ModelCard(Path(hf_hub_download(router_repo, "README.md")).read_text())
    assert "router" in card.data.to_dict()["tags"]
    assert f'from_pretrained(base, "{router_repo}")' in card.text


def test_missing_repo_revision_and_file_are_hub_errors_with_a_hint(tmp_path, hub):
    with pytest.raises(HubError, match="does not exist or you have no access") as caught:
        pull_pack("org/no-such-pack")
    assert type(caught.value.__cause__).__name__ == "RepositoryNotFoundError"  # huggingface_hub's error is kept
    repo = _repo("pack")
    push_pack(_pack(tmp_path / "pack"), repo)
    with pytest.raises(HubError, match="revision 'v9' does not exist"):
        pull_pack(repo, revision="v9")
    with pytest.raises(RoutingError, match="neither a router folder nor a Hub repo id"):
        RoutedGraftModel.from_pretrained(tiny_llama(), "./no/such/router", tiny_tokenizer())
    with pytest.raises(HubError, match="does not exist or you have no access"):
        RoutedGraftModel.from_pretrained(tiny_llama(), "org/no-such-router", tiny_tokenizer())
    config_only = _repo("config-only")
    api = HfApi()
    api.create_repo(config_only)
    api.upload_file(
        path_or_fileobj=tmp_path / "pack" / "adapter_config.json",
        path_in_repo="adapter_config.json",
        repo_id=config_only,
    )
    with pytest.raises(HubError, match="a file is missing"):
        PeftModel.from_pretrained(tiny_llama(), config_only)


def test_network_refused_is_a_clear_error(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = textwrap.dedent(
        """
        import peft_graft
        from peft_graft.hub import pull_pack
        from peft_graft.errors import HubError
        try:
            pull_pack("org/anything")
        except HubError as error:
            print("HubError:", error)
        """
    )
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "HubError:" in result.stdout
    assert "could not be reached" in result.stdout and f"127.0.0.1:{port}" in result.stdout


def test_damaged_download_is_caught_by_the_safetensors_check(tmp_path, hub):
    repo = _repo("damaged")
    push_pack(_pack(tmp_path / "pack"), repo)
    hub.tamper[(repo, "adapter_model.safetensors")] = lambda data: data[:-100]  # header intact, data cut
    with pytest.raises(PackFormatError, match=r"damaged.*truncated"):
        PeftModel.from_pretrained(tiny_llama(), repo)
    with pytest.raises(PackFormatError, match="damaged"):
        pull_pack(repo, local_dir=tmp_path / "pulled", force_download=True)
    hub.tamper[(repo, "adapter_model.safetensors")] = lambda data: b"\xff" * 8 + data[8:]
    with pytest.raises(PackFormatError, match=r"damaged.*not a safetensors file"):
        pull_pack(repo, local_dir=tmp_path / "pulled-again", force_download=True)


def test_flipped_bytes_in_a_download_are_caught_by_the_hash(tmp_path, hub):
    repo = _repo("flipped")
    push_pack(_pack(tmp_path / "pack"), repo)

    def flip(data: bytes) -> bytes:
        return data[:-5] + bytes([data[-5] ^ 0x10]) + data[-4:]  # tensor data; a valid safetensors file still

    hub.tamper[(repo, "adapter_model.safetensors")] = flip
    with pytest.raises(PackFormatError, match=r"does not match the SHA-256.*download it again"):
        PeftModel.from_pretrained(tiny_llama(), repo)
    with pytest.raises(PackFormatError, match="does not match the SHA-256"):
        pull_pack(repo, local_dir=tmp_path / "pulled", force_download=True)


def test_pickle_only_packs_are_refused(tmp_path, hub):
    folder = _pack(tmp_path / "pack")
    tensors = __import__("safetensors.torch", fromlist=["load_file"]).load_file(folder / "adapter_model.safetensors")
    torch.save(tensors, folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(UnsafePackError, match="pickle"):
        PeftModel.from_pretrained(tiny_llama(), folder)
    repo = _repo("pickled")
    api = HfApi()
    api.create_repo(repo)
    api.upload_folder(folder_path=folder, repo_id=repo)
    with pytest.raises(UnsafePackError, match="only pickle weights"):
        PeftModel.from_pretrained(tiny_llama(), repo)
    with pytest.raises(UnsafePackError, match="only pickle weights"):
        pull_pack(repo)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"peft_type": "NOT_A_METHOD"}, "not 'GRAFT'"),
        ({"precision_bands": [[16, 5]]}, "bits must be one of"),
        ({"r": -4}, "r must be a positive integer"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"base_model_fingerprint": 17}, "base_model_fingerprint"),
    ],
)
def test_invalid_adapter_configs_are_refused(tmp_path, change, message):
    folder = _pack(tmp_path / "pack")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(PackFormatError, match=message):
        check_pack_folder(folder)


@pytest.mark.parametrize("path", ["../outside", "/etc", "packs/../../outside", "~/pack"])
def test_router_paths_leaving_the_folder_are_refused(tmp_path, path):
    routed = RoutedGraftModel.from_packs(tiny_llama(), {"math": _pack(tmp_path / "math")}, tiny_tokenizer())
    routed.save_pretrained(tmp_path / "router")
    config_file = tmp_path / "router" / "router_config.json"
    config = json.loads(config_file.read_text())
    config["packs"]["math"] = {"path": path}
    config_file.write_text(json.dumps(config))
    with pytest.raises(UnsafePackError, match="router folder"):
        RoutedGraftModel.from_pretrained(tiny_llama(), tmp_path / "router", tiny_tokenizer())


def test_cli_push_and_pull(tmp_path, hub, capsys):
    repo = _repo("cli")
    folder = _pack(tmp_path / "pack")
    assert cli(["push", str(folder), repo, "--tag", "v1"]) == 0
    assert "tag v1" in capsys.readouterr().out
    assert cli(["pull", repo, str(tmp_path / "pulled"), "--revision", "v1"]) == 0
    pulled = PeftModel.from_pretrained(tiny_llama(), tmp_path / "pulled").eval()
    assert torch.equal(_logits(pulled), _logits(PeftModel.from_pretrained(tiny_llama(), folder).eval()))
    assert (tmp_path / "pulled" / "README.md").is_file()
    assert cli(["pull", "org/nothing-here", str(tmp_path / "none")]) == 2
    error = capsys.readouterr().err
    assert "cannot pull the pack org/nothing-here: the repo does not exist or you have no access" in error
    assert cli(["pull", repo, str(tmp_path / "none"), "--revision", "nope"]) == 2
    error = capsys.readouterr().err  # about the pack and its revision, not the router file looked for first
    assert "revision 'nope' does not exist" in error and "router_config.json" not in error


def test_push_to_hub_takes_transformers_keywords_and_refuses_unknown_ones(tmp_path, hub):
    repo = _repo("keywords")
    model = PeftModel.from_pretrained(tiny_llama(), _pack(tmp_path / "pack")).eval()
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) bogus_kwarg; it takes .*commit_description"):
        model.push_to_hub(repo, bogus_kwarg=1)
    assert not HfApi().repo_exists(repo)  # refused before anything was created
    model.push_to_hub(repo, tags=["arithmetic", "demo"], commit_description="first pack", private=True)
    data = ModelCard(Path(hf_hub_download(repo, "README.md")).read_text()).data.to_dict()
    assert {"peft", "graft", "skillpack", "arithmetic", "demo"} <= set(data["tags"])


def test_a_tag_that_exists_is_refused_before_any_commit(tmp_path, hub, capsys):
    repo = _repo("tagged")
    api = HfApi()
    first = push_pack(_pack(tmp_path / "v1", seed=1), repo, tag="v1")
    with pytest.raises(HubError, match="the tag 'v1' already exists there; choose another tag"):
        push_pack(_pack(tmp_path / "v2", seed=2), repo, tag="v1")
    assert api.list_repo_refs(repo).branches[0].target_commit == first  # nothing was committed
    assert cli(["push", str(tmp_path / "v2"), repo, "--tag", "v1"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("peft-graft: error: cannot push to") and "already exists" in error
    assert len(error.strip().splitlines()) == 1
    assert api.list_repo_refs(repo).branches[0].target_commit == first
