"""``PreTrainedModel.load_adapter`` for GRAFT packs.

transformers 5 loads adapters with its own weight-loading pipeline, which renames checkpoint keys by regex and has no
per-method hook, so packed tensors would arrive as "unexpected keys". For GRAFT configs only, ``load_adapter`` goes
through PEFT's ``inject_adapter_in_model`` + ``set_peft_model_state_dict`` instead (what transformers 4 did), which
decodes the pack. Every other adapter type keeps transformers' own path, untouched.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from ..pack.layout import KEY_PREFIX, PEFT_TYPE

logger = logging.getLogger(__name__)

_DOWNLOAD_KEYS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


def route_graft_load_adapter() -> None:  # applied by integrations/__init__.py
    """Wrap ``PeftAdapterMixin.load_adapter`` once; non-GRAFT adapters are passed to the original unchanged."""
    from transformers.integrations.peft import PeftAdapterMixin

    original = PeftAdapterMixin.load_adapter
    if getattr(original, "_peft_graft_wrapped", False):
        return

    @functools.wraps(original)
    def load_adapter(self, peft_model_id: str | None = None, adapter_name: str | None = None, *args, **kwargs):
        config = _graft_config_or_none(peft_model_id, kwargs)
        if config is None:
            return original(self, peft_model_id, adapter_name, *args, **kwargs)
        if args:
            raise TypeError("pass load_adapter's options by keyword when loading a GRAFT adapter")
        return _load_graft_adapter(self, peft_model_id, adapter_name, config, **kwargs)

    load_adapter._peft_graft_wrapped = True
    PeftAdapterMixin.load_adapter = load_adapter


def _download_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    load_config = kwargs.get("load_config")
    merged: dict[str, Any] = dict(getattr(load_config, "download_kwargs", None) or {})
    merged.update(kwargs.get("adapter_kwargs") or {})
    merged.update({key: kwargs[key] for key in _DOWNLOAD_KEYS if key in kwargs})
    return {key: value for key, value in merged.items() if key in _DOWNLOAD_KEYS and value is not None}


def _graft_config_or_none(peft_model_id: str | None, kwargs: dict[str, Any]):
    from peft import PeftConfig

    from ..config import GraftConfig

    given = kwargs.get("peft_config")
    if given is not None:
        return given if isinstance(given, GraftConfig) else None
    if peft_model_id is None:
        return None
    download = _download_kwargs(kwargs)
    try:
        peft_type = PeftConfig._get_peft_type(peft_model_id, **download)
    except ValueError:
        return None  # no adapter config found: let transformers raise its own error
    if peft_type != PEFT_TYPE:
        return None
    return GraftConfig.from_pretrained(peft_model_id, **download)


def _load_graft_adapter(
    model,
    peft_model_id: str | None,
    adapter_name: str | None,
    config,
    adapter_state_dict=None,
    low_cpu_mem_usage: bool = False,
    is_trainable: bool = False,
    hotswap: bool | str = "auto",
    **kwargs: Any,
):
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..hub import load_pack_weights

    adapter_name = adapter_name or "default"
    if hotswap is True:
        raise ValueError("Hotswapping is only supported for LoRA adapters; load the GRAFT pack with hotswap=False.")
    if getattr(model, "_hf_peft_config_loaded", False) and adapter_name in model.peft_config:
        raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
    if adapter_state_dict is None:
        if peft_model_id is None:
            raise ValueError("pass peft_model_id, or peft_config together with adapter_state_dict")
        adapter_state_dict = load_pack_weights(peft_model_id, **_download_kwargs(kwargs))
    config.inference_mode = not is_trainable
    inject_adapter_in_model(config, model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    result = set_peft_model_state_dict(model, adapter_state_dict, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    model._hf_peft_config_loaded = True
    if config.inference_mode:
        model.eval()
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.requires_grad_(False)
    missing = [key for key in result.missing_keys if KEY_PREFIX in key and f".{adapter_name}" in key]
    if missing:
        logger.warning("GRAFT adapter %r is missing weights for: %s", adapter_name, ", ".join(missing))
    if result.unexpected_keys:
        logger.warning("GRAFT adapter %r has unused weights: %s", adapter_name, ", ".join(result.unexpected_keys))
    return result
