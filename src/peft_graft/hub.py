"""SkillPacks and routers on the Hugging Face Hub: push, pull, and safe loading of pack files.

Everything goes through ``huggingface_hub`` (``create_repo``, ``create_commit``, ``create_tag``,
``hf_hub_download``, ``snapshot_download``). Packs load only from safetensors and JSON: a pack that offers only
pickle weights is refused, configs are validated before anything is attached, and downloaded weight files are
checked against their safetensors header so a truncated or corrupted download fails with a clear error.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .cards import CARD_FILE, pack_card
from .checkpoint import TOKENIZER_FILES, read_safetensors_header
from .errors import CheckpointError, GraftConfigError, HubError, PackFormatError, UnsafePackError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REPORT_FILE = "graft_report.json"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
# What a pack folder may hold; nothing else is downloaded or uploaded.
PACK_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, REPORT_FILE, CARD_FILE, *TOKENIZER_FILES)
_DOWNLOAD_KEYS = ("revision", "token", "cache_dir", "force_download", "local_files_only", "subfolder")


# ----- validation ----------------------------------------------------------------------------------------------------


def validate_pack_config(config: dict[str, Any], where: str) -> None:
    """Refuse an adapter_config.json that is not a valid GRAFT config (before anything is attached)."""
    from .config import GraftConfig

    if not isinstance(config, dict):
        raise PackFormatError(f"{where}: adapter_config.json must hold a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "GRAFT":
        raise PackFormatError(
            f"{where}: adapter_config.json has peft_type {peft_type!r}, not 'GRAFT'; this is not a SkillPack "
            "(load other adapter types with PEFT directly)"
        )
    known = set(GraftConfig.__dataclass_fields__)
    try:
        GraftConfig(**{key: value for key, value in config.items() if key in known})
    except (GraftConfigError, TypeError, ValueError) as error:
        raise PackFormatError(f"{where}: invalid adapter_config.json: {error}") from None


def check_pack_weights(file: str | os.PathLike, where: str) -> None:
    """Check that a pack file is a complete safetensors file (catches truncated or corrupted downloads)."""
    try:
        read_safetensors_header(Path(file))
    except CheckpointError as error:
        raise PackFormatError(
            f"{where}: the pack weights are damaged ({error}). If they were downloaded, download them again "
            "(force_download=True) or check the repo."
        ) from None


def check_pack_folder(folder: str | os.PathLike) -> Path:
    """Validate a local pack folder: a GRAFT config, safetensors weights, no pickle. Returns the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise PackFormatError(f"{folder} has no {ADAPTER_CONFIG}: it is not a SkillPack folder")
    validate_pack_config(_read_json(config_file, str(folder)), str(folder))
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = [name for name in PICKLE_WEIGHTS if (folder / name).exists()]
        if pickled:
            raise UnsafePackError(
                f"{folder} holds only pickle weights ({', '.join(pickled)}), which can run code when loaded; "
                "SkillPacks load from safetensors only. Re-save the pack with safe_serialization=True."
            )
        raise PackFormatError(f"{folder} has no {ADAPTER_WEIGHTS}")
    check_pack_weights(weights, str(folder))
    return folder


# ----- loading -------------------------------------------------------------------------------------------------------


def is_graft_adapter(model_id: str | os.PathLike, **download: Any) -> bool:
    """Whether the adapter at `model_id` (folder or Hub repo) is a GRAFT pack; False when it has no config."""
    from peft import PeftConfig

    try:
        return PeftConfig._get_peft_type(str(model_id), **_download_kwargs(download)) == "GRAFT"
    except (ValueError, OSError):
        return False


def pack_weights_file(model_id: str | os.PathLike, **download: Any) -> Path:
    """The checked ``adapter_model.safetensors`` of a pack (local folder, or downloaded from a Hub repo)."""
    download = _download_kwargs(download)
    subfolder = download.pop("subfolder", None)
    local = Path(model_id) / subfolder if subfolder else Path(model_id)
    if local.is_dir():
        return check_pack_folder(local) / ADAPTER_WEIGHTS
    weights = Path(_download_weights(str(model_id), subfolder, download))
    check_pack_weights(weights, f"{model_id} (downloaded to {weights})")
    return weights


def load_pack_weights(model_id: str | os.PathLike, device: str | None = None, **download: Any) -> dict:
    """The tensors of a pack, from ``adapter_model.safetensors`` only (local folder or Hub repo)."""
    from safetensors.torch import load_file

    return load_file(pack_weights_file(model_id, **download), device=device or "cpu")


def _download_weights(repo_id: str, subfolder: str | None, download: dict[str, Any]) -> str:
    from huggingface_hub import file_exists, hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    with hub_errors("download the pack", repo_id, download.get("revision")):
        try:
            return hf_hub_download(repo_id, ADAPTER_WEIGHTS, subfolder=subfolder, **download)
        except RemoteEntryNotFoundError:
            revision, token = download.get("revision"), download.get("token")
            prefix = f"{subfolder}/" if subfolder else ""
            pickled = [
                name for name in PICKLE_WEIGHTS if file_exists(repo_id, prefix + name, revision=revision, token=token)
            ]
            if pickled:
                raise UnsafePackError(
                    f"{repo_id} offers only pickle weights ({', '.join(pickled)}), which can run code when loaded; "
                    "SkillPacks load from safetensors only"
                ) from None
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
                allow_patterns=list(PACK_FILES),
                force_download=force_download,
            )
        )
        if not (folder / ADAPTER_WEIGHTS).is_file():
            pickled = [
                name for name in list_repo_files(repo_id, revision=revision, token=token) if name in PICKLE_WEIGHTS
            ]
            if pickled:
                raise UnsafePackError(
                    f"{repo_id} offers only pickle weights ({', '.join(pickled)}), which can run code when loaded; "
                    "SkillPacks load from safetensors only"
                )
    return check_pack_folder(folder)


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
    create_pr: bool = False,
) -> str:
    """Upload a pack folder (with a freshly rendered model card) as one commit; optionally tag it.

    Returns the commit id. Only the pack's own files are uploaded.
    """
    folder = check_pack_folder(folder)
    card = str(pack_card(folder, repo_id=repo_id)).encode("utf-8")
    files = [folder / name for name in PACK_FILES if name != CARD_FILE and (folder / name).is_file()]
    return upload_files(
        repo_id,
        files,
        {CARD_FILE: card},
        revision=revision,
        tag=tag,
        private=private,
        token=token,
        commit_message=commit_message or "Upload SkillPack with peft-graft",
        create_pr=create_pr,
        root=folder,
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
) -> str:
    """Create the repo if needed, then commit `files` (paths relative to `root`) plus in-memory `extra` files."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    operations = [CommitOperationAdd(path_in_repo=f.relative_to(root).as_posix(), path_or_fileobj=f) for f in files]
    operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in extra.items()]
    with hub_errors("push to", repo_id, revision):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(
            repo_id, operations, commit_message=commit_message, revision=revision, create_pr=create_pr
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
    try:
        yield
    except errors.RevisionNotFoundError as error:
        raise HubError(
            f"cannot {action} {where}: revision {revision!r} does not exist; check the branch/tag"
        ) from error
    except errors.RemoteEntryNotFoundError as error:
        raise HubError(f"cannot {action} {where}: a file is missing from the repo ({error.response.url})") from error
    except errors.RepositoryNotFoundError as error:
        raise HubError(
            f"cannot {action} {where}: the repo does not exist or you have no access; check the repo id, and log in "
            "(`hf auth login`) for private repos"
        ) from error
    except errors.LocalEntryNotFoundError as error:
        raise HubError(
            f"cannot {action} {where}: the Hub ({_endpoint()}) could not be reached and nothing is cached; check "
            "the network / HF_ENDPOINT, or use a local folder"
        ) from error
    except errors.HfHubHTTPError as error:
        raise HubError(f"cannot {action} {where}: the Hub answered {error}") from error
    except OSError as error:
        if isinstance(error, (FileNotFoundError, PermissionError)):
            raise
        raise HubError(f"cannot {action} {where}: {error} (is {_endpoint()} reachable?)") from error
    except Exception as error:
        if type(error).__module__.startswith(("httpx", "httpcore")):
            raise HubError(f"cannot {action} {where}: {error} (is {_endpoint()} reachable?)") from error
        raise


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _download_kwargs(download: dict[str, Any]) -> dict[str, Any]:
    return {key: download[key] for key in _DOWNLOAD_KEYS if download.get(key) is not None}


def _read_json(path: Path, where: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PackFormatError(f"{where}: {path.name} is not valid JSON ({error})") from None


__all__ = [
    "check_pack_folder",
    "load_pack_weights",
    "pull_pack",
    "push_pack",
    "validate_pack_config",
]
