"""Known incompatible upstream pairs, detected by what the installed versions do (never by version strings).

Each probe runs the smallest real operation that the incompatibility breaks and returns why it failed, or None.
Tests that need the capability use the matching xfail marker: with a bad pair they are reported as an xfail that
names the pair (strict, so a wrong probe fails loudly); with a good pair they run as usual. docs/install.md's
Compatibility table lists the same pairs.
"""

from __future__ import annotations

import functools
from importlib.metadata import version

import pytest
from peft import LoraConfig

from tiny_models import tiny_llama


@functools.cache
def transformers_adapter_api_refusal() -> str | None:
    """Why transformers' own adapter API (add / disable adapters) refuses the installed PEFT, or None if it works.

    transformers 5.24 requires peft >= 0.22 in `disable_adapters()`, `set_adapter()`, `delete_adapter()` and the
    rest of `PeftAdapterMixin`, while peft 0.22 is not released.
    """
    model = tiny_llama()
    try:
        model.add_adapter(LoraConfig(target_modules=["q_proj"], r=2))
        model.disable_adapters()
    except ValueError as error:
        return (
            f"known bad pair: transformers {version('transformers')} with peft {version('peft')}: "
            f"transformers' adapter API refuses this PEFT ({error})"
        )
    return None


needs_transformers_adapter_api = pytest.mark.xfail(
    transformers_adapter_api_refusal() is not None,
    reason=transformers_adapter_api_refusal() or "",
    raises=ValueError,
    strict=True,
)
