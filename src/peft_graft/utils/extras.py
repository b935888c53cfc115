"""Optional dependencies: which extra installs which modules, checked before any work starts."""

from __future__ import annotations

import importlib.util

from ..errors import MissingExtraError

# extra -> the modules it installs that peft-graft imports (pyproject.toml's optional-dependencies)
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "eval": ("evaluate", "reasoning_gym"),
    "serve": ("fastapi", "uvicorn", "httpx"),
    "gguf": ("gguf",),
    "trl": ("trl", "datasets"),
}


def require_extra(extra: str, needed_by: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise :class:`MissingExtraError` naming `extra` if one of its modules (or of `modules`) is not installed.

    Only looks the modules up (no import), so it is cheap enough to call before loading any model.
    """
    missing = [name for name in modules or EXTRA_MODULES[extra] if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(
            f"{needed_by} needs the {extra!r} extra ({', '.join(missing)} missing): pip install 'peft-graft[{extra}]'",
            extra=extra,
        )
