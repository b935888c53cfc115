"""SkillPacks and routers on the Hugging Face Hub: transport only (push, pull, download a pack's weights).

Everything goes through ``huggingface_hub`` (``create_repo``, ``create_commit``, ``create_tag``,
``hf_hub_download``, ``snapshot_download``). What is downloaded is checked by ``peft_graft.pack.folder`` before use:
only safetensors and JSON, pickle refused, weight files checked against their safetensors header, so a truncated or
corrupted download fails with a clear error.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import HubError, PackFormatError
from .pack import layout
from .pack.card import pack_card
from .pack.folder import PackFolder, check_pack_weights, pickle_refusal, validate_pack_config, verify_weights
from .utils.jsonio import read_json

_DOWNLOAD_KEYS = ("revision", "token", "cache_dir", "force_download", "local_files_only", "subfolder")


def check_pack_folder(folder: str | os.PathLike) -> Path:
    """Validate a local pack folder (GRAFT config, safetensors weights, no pickle). Returns the folder."""
    return PackFolder(folder).path


# ----- loading -------------------------------------------------------------------------------------------------------


def is_graft_adapter(model_id: str | os.PathLike, **download: Any) -> bool:
    """Whether the adapter at `model_id` (folder or Hub repo) is a GRAFT pack; False when it has no config."""
    from peft import PeftConfig

    try:
        return PeftConfig._get_peft_type(str(model_id), **_download_kwargs(download)) == layout.PEFT_TYPE
    except (ValueError, OSError):
        return False


def pack_weights_file(model_id: str | os.PathLike, **download: Any) -> Path:
    """The checked weight file of a pack (local folder, or downloaded from a Hub repo)."""
    download = _download_kwargs(download)
    subfolder = download.pop("subfolder", None)
    local = Path(model_id) / subfolder if subfolder else Path(model_id)
    if local.is_dir():
        return PackFolder(local).weights_file
    weights = Path(_download_weights(str(model_id), subfolder, download))
    where = f"{model_id} (downloaded to {weights})"
    check_pack_weights(weights, where)
    from huggingface_hub import hf_hub_download

    with hub_errors("download the pack", str(model_id), download.get("revision")):
        config_file = Path(hf_hub_download(str(model_id), layout.ADAPTER_CONFIG, subfolder=subfolder, **download))
    try:
        config = read_json(config_file)
    except (UnicodeDecodeError, ValueError) as error:
        raise PackFormatError(
            f"{where}: {layout.ADAPTER_CONFIG} is not valid JSON ({error})", path=config_file
        ) from None
    validate_pack_config(config, where)
    verify_weights(config.get("weights_sha256"), weights, where)
    return weights


def load_pack_weights(model_id: str | os.PathLike, device: str | None = None, **download: Any) -> dict:
    """The tensors of a pack, from its safetensors weight file only (local folder or Hub repo)."""
    from safetensors.torch import load_file

    return load_file(pack_weights_file(model_id, **download), device=device or "cpu")


def _download_weights(repo_id: str, subfolder: str | None, download: dict[str, Any]) -> str:
    from huggingface_hub import file_exists, hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    with hub_errors("download the pack", repo_id, download.get("revision")):
        try:
            return hf_hub_download(repo_id, layout.ADAPTER_WEIGHTS, subfolder=subfolder, **download)
        except RemoteEntryNotFoundError:
            revision, token = download.get("revision"), download.get("token")
            prefix = f"{subfolder}/" if subfolder else ""
            pickled = [
                name
                for name in layout.PICKLE_WEIGHTS
                if file_exists(repo_id, prefix + name, revision=revision, token=token)
            ]
            if pickled:
                raise pickle_refusal(repo_id, pickled) from None
            raise


def pull_pack(
    repo_id: str,
    local_dir: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    force_download: bool = False,
) -> Path:
    """Download a pack (its safetensors, JSON, card and tokenizer files only) and validate it. Returns its folder."""
    from huggingface_hub import list_repo_files, snapshot_download

    with hub_errors("pull the pack", repo_id, revision):
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                token=token,
                local_dir=local_dir,
                allow_patterns=list(layout.PACK_FILES),
                force_download=force_download,
            )
        )
        if not (folder / layout.ADAPTER_WEIGHTS).is_file():
            pickled = [
                name
                for name in list_repo_files(repo_id, revision=revision, token=token)
                if name in layout.PICKLE_WEIGHTS
            ]
            if pickled:
                raise pickle_refusal(repo_id, pickled)
    return PackFolder(folder).path


# ----- pushing -------------------------------------------------------------------------------------------------------


def push_pack(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    tag: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
) -> str:
    """Upload a pack folder (with a freshly rendered model card) as one commit; optionally tag the commit (`tag`,
    refused before the upload if it exists). `tags` are model-card tags, as in ``transformers``' ``push_to_hub``.

    Returns the commit id. Only the pack's own files are uploaded.
    """
    pack = PackFolder(folder)
    card = str(pack_card(pack, repo_id=repo_id, tags=tags)).encode("utf-8")
    files = [file for file in pack.files() if file.name != layout.CARD_FILE]
    return upload_files(
        repo_id,
        files,
        {layout.CARD_FILE: card},
        revision=revision,
        tag=tag,
        private=private,
        token=token,
        commit_message=commit_message or "Upload SkillPack with peft-graft",
        commit_description=commit_description,
        create_pr=create_pr,
        root=pack.path,
    )


def upload_files(
    repo_id: str,
    files: list[Path],
    extra: dict[str, bytes],
    *,
    root: Path,
    revision: str | None,
    tag: str | None,
    private: bool | None,
    token: str | bool | None,
    commit_message: str,
    create_pr: bool,
    commit_description: str | None = None,
) -> str:
    """Create the repo if needed, then commit `files` (paths relative to `root`) plus in-memory `extra` files; a
    `tag` that already exists is refused before anything is committed."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    operations = [CommitOperationAdd(path_in_repo=f.relative_to(root).as_posix(), path_or_fileobj=f) for f in files]
    operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in extra.items()]
    with hub_errors("push to", repo_id, revision):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if tag is not None and tag in {ref.name for ref in api.list_repo_refs(repo_id).tags}:
            raise HubError(
                f"cannot push to {repo_id}: the tag {tag!r} already exists there; choose another tag (nothing was "
                "uploaded)",
                repo_id=repo_id,
                revision=revision,
            )
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )
        if tag is not None:
            api.create_tag(repo_id, tag=tag, revision=info.oid)
    return info.oid


# ----- errors --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def hub_errors(action: str, repo_id: str, revision: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub's errors into HubError with a hint (the original stays attached as the cause)."""
    from huggingface_hub import errors

    where = f"{repo_id}@{revision}" if revision else repo_id

    def failed(message: str) -> HubError:
        return HubError(f"cannot {action} {where}: {message}", repo_id=repo_id, revision=revision)

    try:
        yield
    except errors.RevisionNotFoundError as error:
        raise failed(f"revision {revision!r} does not exist; check the branch/tag") from error
    except errors.RemoteEntryNotFoundError as error:
        raise failed(f"a file is missing from the repo ({error.response.url})") from error
    except errors.RepositoryNotFoundError as error:
        raise failed(
            "the repo does not exist or you have no access; check the repo id, and log in (`hf auth login`) for "
            "private repos"
        ) from error
    except errors.LocalEntryNotFoundError as error:
        raise failed(
            f"the Hub ({_endpoint()}) could not be reached and nothing is cached; check the network / HF_ENDPOINT, "
            "or use a local folder"
        ) from error
    except errors.HfHubHTTPError as error:
        raise failed(f"the Hub answered {error}") from error
    except OSError as error:
        if isinstance(error, (FileNotFoundError, PermissionError, HubError)):
            raise
        raise failed(f"{error} (is {_endpoint()} reachable?)") from error
    except _transport_errors() as error:
        raise failed(f"{error} (is {_endpoint()} reachable?)") from error


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's own error classes (httpx for huggingface_hub 1.x, httpx2 for 2.x), where installed."""
    found = []
    for module in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(module).HTTPError)
        except ImportError:
            continue
    return tuple(found)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _download_kwargs(download: dict[str, Any]) -> dict[str, Any]:
    return {key: download[key] for key in _DOWNLOAD_KEYS if download.get(key) is not None}


__all__ = ["check_pack_folder", "load_pack_weights", "pull_pack", "push_pack"]
