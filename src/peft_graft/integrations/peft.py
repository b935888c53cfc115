"""Make PEFT know the GRAFT method, and PEFT's patches. Everything here is idempotent: re-running it is harmless.

The patches change PEFT's behaviour for GRAFT adapters only; integrations/__init__.py applies them, version-gated.
"""

from __future__ import annotations

import inspect

from peft.utils import PeftType

from ..pack.layout import KEY_PREFIX, PEFT_TYPE

_NAME = PEFT_TYPE


def add_peft_type_member() -> None:
    """Add ``PeftType.GRAFT`` to PEFT's str-Enum (PEFT has no plugin discovery; its mappings key on enum members)."""
    if _NAME in PeftType.__members__:
        return
    member = str.__new__(PeftType, _NAME)
    member._name_ = _NAME
    member._value_ = _NAME
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    if hasattr(PeftType, "_add_member_"):  # Python >= 3.13: sets the class attribute and _member_map_
        PeftType._add_member_(_NAME, member)
    else:
        type.__setattr__(PeftType, _NAME, member)
        PeftType._member_map_[_NAME] = member
    PeftType._member_names_.append(_NAME)  # iteration order
    PeftType._value2member_map_[_NAME] = member


def register_graft_method() -> None:
    """Register GraftConfig / GraftModel under ``peft_type="GRAFT"`` (prefix ``graft_``)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from ..config import GraftConfig
    from ..model import GraftModel

    add_peft_type_member()
    peft_type = PeftType(_NAME)
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered is None:
        register_peft_method(name=_NAME.lower(), config_cls=GraftConfig, model_cls=GraftModel, prefix=KEY_PREFIX)
    elif registered is not GraftConfig:
        if not registered.__module__.startswith("peft_graft"):
            raise RuntimeError(
                f"PEFT type {_NAME} is already registered by {registered.__module__}.{registered.__qualname__}; "
                "two plugins claim the same name, so only one of them can be imported in a process"
            )
        # peft_graft was re-imported (e.g. importlib.reload): point PEFT at the current classes
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = GraftConfig
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = GraftModel
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = KEY_PREFIX


def keep_base_embeddings_out_of_packs() -> None:
    """Stop PEFT from copying the full base embedding / lm_head weights into a GRAFT adapter file.

    With ``save_embedding_layers="auto"`` (the default), PEFT saves the *base* weights of targeted embedding layers
    next to the adapter. A SkillPack stores only the compressed delta, so for GRAFT layers those base weights are never
    part of the adapter. PEFT decides this through ``has_valid_embedding_base_layer``; we wrap it for GRAFT layers.
    """
    from peft.utils import save_and_load

    original = save_and_load.has_valid_embedding_base_layer
    if getattr(original, "_peft_graft_wrapped", False):
        return

    def has_valid_embedding_base_layer(layer) -> bool:
        from peft_graft.layer import GraftLayer  # looked up per call, so a reloaded module is honoured

        return not isinstance(layer, GraftLayer) and original(layer)

    has_valid_embedding_base_layer._peft_graft_wrapped = True
    save_and_load.has_valid_embedding_base_layer = has_valid_embedding_base_layer


def load_packs_from_safetensors_only() -> None:
    """``PeftModel.load_adapter`` reads GRAFT packs through ``peft_graft.hub.pack_weights_file``.

    PEFT falls back to pickle (``adapter_model.bin``) when a repo has no safetensors file; a SkillPack never does, and
    its weight file is checked against its safetensors header first, so a damaged download fails clearly.
    """
    from peft import peft_model

    original = peft_model.load_peft_weights
    if getattr(original, "_peft_graft_wrapped", False):
        return

    def load_peft_weights(model_id, device=None, key_mapping=None, **download):
        from peft_graft.hub import is_graft_adapter, pack_weights_file

        if is_graft_adapter(model_id, **download):
            # PEFT loads the checked file from its folder: safetensors is found there first, key_mapping applies
            return original(str(pack_weights_file(model_id, **download).parent), device=device, key_mapping=key_mapping)
        return original(model_id, device=device, key_mapping=key_mapping, **download)

    load_peft_weights._peft_graft_wrapped = True
    peft_model.load_peft_weights = load_peft_weights


def withdraw_refused_packs() -> None:
    """``PeftModel.load_adapter`` leaves the model as it was when a GRAFT pack is refused while its weights are read.

    PEFT injects an adapter's layers before it reads the weights (``from_pretrained`` even before ``load_adapter``),
    so a pack refused by the weight file's checks (its content hash, its safetensors header) would leave empty GRAFT
    layers in the user's base model; they are taken out again, as they are for a pack refused while decoding.
    """
    from peft import PeftModel

    original = PeftModel.load_adapter
    if getattr(original, "_peft_graft_wrapped", False):
        return

    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        from peft_graft.errors import GraftError
        from peft_graft.model import withdraw_adapter

        try:
            return original(self, model_id, adapter_name, *args, **kwargs)
        except GraftError:
            config = self.peft_config.get(adapter_name)
            if config is not None and config.peft_type == _NAME:
                withdraw_adapter(self.base_model.model, adapter_name)
            raise

    load_adapter._peft_graft_wrapped = True
    PeftModel.load_adapter = load_adapter


def write_pack_cards_on_save() -> None:
    """``save_pretrained`` writes the SkillPack model card next to each GRAFT adapter; ``push_to_hub`` uploads it.

    PEFT writes its generic adapter card before the weights exist; a pack's card describes the saved file (bytes per
    module, base fingerprint), so it is rendered after saving. transformers' ``push_to_hub`` would then replace the
    README with the Hub's copy, so for GRAFT-only models the push goes through ``peft_graft.hub``.
    """
    from peft import PeftModel

    original_save = PeftModel.save_pretrained
    if getattr(original_save, "_peft_graft_wrapped", False):
        return

    def save_pretrained(self, save_directory, safe_serialization=True, selected_adapters=None, **kwargs):
        import os

        from peft_graft.pack.card import write_pack_card
        from peft_graft.pack.folder import PackFolder
        from peft_graft.utils.atomic import folder_lock, follow_umask

        if not any(config.peft_type == _NAME for config in self.peft_config.values()):
            return original_save(
                self, save_directory, safe_serialization=safe_serialization, selected_adapters=selected_adapters,
                **kwargs,
            )  # fmt: skip
        # concurrent saves into one folder take turns: interleaved, they mixed one save's config with another's
        # weights (a hash mismatch) or failed half-way
        with folder_lock(os.path.abspath(save_directory)):
            original_save(
                self, save_directory, safe_serialization=safe_serialization, selected_adapters=selected_adapters,
                **kwargs,
            )  # fmt: skip
            if kwargs.get("is_main_process", True) is False or not safe_serialization:
                return
            for name in selected_adapters or list(self.peft_config):
                if self.peft_config[name].peft_type == _NAME:
                    folder = save_directory if name == "default" else os.path.join(save_directory, name)
                    write_pack_card(folder)
                    # safetensors writes the weights 0600: a saved pack follows the umask, like any file
                    follow_umask(*PackFolder(folder, require_weights=False).files())

    original_push = PeftModel.push_to_hub

    def push_to_hub(self, repo_id: str, *args, **kwargs):
        if args or not all(config.peft_type == _NAME for config in self.peft_config.values()):
            return original_push(self, repo_id, *args, **kwargs)
        known = [name for name in inspect.signature(_push_graft_model).parameters if name not in ("model", "repo_id")]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise TypeError(
                f"push_to_hub() got unexpected keyword argument(s) {', '.join(unknown)}; it takes {', '.join(known)}"
            )
        return _push_graft_model(self, repo_id, **kwargs)

    save_pretrained._peft_graft_wrapped = True
    push_to_hub.__doc__ = original_push.__doc__
    PeftModel.save_pretrained = save_pretrained
    PeftModel.push_to_hub = push_to_hub


def _push_graft_model(
    model,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token=None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
    tag: str | None = None,
    max_shard_size: int | str | None = None,
):
    """transformers' ``push_to_hub`` for a SkillPack: the same keywords, and `tag` (a git tag of the commit) besides;
    an unknown keyword is a TypeError, as for any function. `max_shard_size` changes nothing (a pack is one file)."""
    import tempfile

    from peft_graft.hub import push_pack

    if len(model.peft_config) != 1:
        raise ValueError(
            f"push_to_hub pushes one SkillPack per repo; this model holds {len(model.peft_config)} adapters. "
            "Save them with save_pretrained and push each folder with peft_graft.push_pack."
        )
    (adapter_name,) = model.peft_config
    with tempfile.TemporaryDirectory(prefix="graft-push-") as folder:
        model.save_pretrained(folder)
        pack = folder if adapter_name == "default" else f"{folder}/{adapter_name}"
        return push_pack(
            pack,
            repo_id,
            revision=revision,
            tag=tag,
            private=private,
            token=token,
            commit_message=commit_message,
            commit_description=commit_description,
            create_pr=create_pr,
            tags=tags,
        )
