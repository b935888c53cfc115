"""Make PEFT know the GRAFT method. Everything here is idempotent: importing twice, or re-running it, is harmless."""

from __future__ import annotations

from peft.utils import PeftType

from .transformers_integration import route_graft_load_adapter

_NAME = "GRAFT"


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

    from .config import GraftConfig
    from .model import GraftModel

    add_peft_type_member()
    peft_type = PeftType(_NAME)
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered is None:
        register_peft_method(name=_NAME.lower(), config_cls=GraftConfig, model_cls=GraftModel, prefix="graft_")
    elif registered is not GraftConfig:
        if not registered.__module__.startswith("peft_graft"):
            raise RuntimeError(
                f"PEFT type {_NAME} is already registered by {registered.__module__}.{registered.__qualname__}; "
                "two plugins claim the same name, so only one of them can be imported in a process"
            )
        # peft_graft was re-imported (e.g. importlib.reload): point PEFT at the current classes
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = GraftConfig
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = GraftModel
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = "graft_"
    _keep_base_embeddings_out_of_packs()
    route_graft_load_adapter()


def _keep_base_embeddings_out_of_packs() -> None:
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
