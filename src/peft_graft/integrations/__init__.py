"""Where peft-graft changes third-party libraries: the registration with PEFT, and one table of patches.

PEFT has no plugin discovery and transformers 5 loads adapters with its own pipeline, so a few functions are wrapped,
each for GRAFT adapters only (other adapter types go to the original, unchanged). Every patch names the versions it
was written against; outside them it is not applied, and a warning says what is missing, instead of wrapping a
function whose contract may have changed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from . import peft as peft_patches
from . import transformers as transformers_patches


@dataclass(frozen=True)
class Patch:
    """A change to a third-party function, applied when the installed `package` is in `versions`."""

    name: str
    package: str
    versions: str
    apply: Callable[[], None]
    without_it: str


PATCHES = (
    Patch(
        "peft.utils.save_and_load.has_valid_embedding_base_layer",
        "peft",
        ">=0.21,<0.22",
        peft_patches.keep_base_embeddings_out_of_packs,
        "save_pretrained would copy the base embedding / lm_head weights into packs that target them",
    ),
    Patch(
        "peft.peft_model.load_peft_weights",
        "peft",
        ">=0.21,<0.22",
        peft_patches.load_packs_from_safetensors_only,
        "packs would load without the safetensors-only check, and a damaged download would fail unclearly",
    ),
    Patch(
        "peft.PeftModel.load_adapter",
        "peft",
        ">=0.21,<0.22",
        peft_patches.withdraw_refused_packs,
        "a pack refused while its weights are read (e.g. a hash mismatch) would leave empty GRAFT layers in the model",
    ),
    Patch(
        "peft.PeftModel.save_pretrained / push_to_hub",
        "peft",
        ">=0.21,<0.22",
        peft_patches.write_pack_cards_on_save,
        "saved packs would get PEFT's generic model card instead of the SkillPack card",
    ),
    Patch(
        "transformers PeftAdapterMixin.load_adapter",
        "transformers",
        ">=5.0,<6",
        transformers_patches.route_graft_load_adapter,
        "model.load_adapter(pack) would not decode packs (use PeftModel.from_pretrained)",
    ),
)


def register() -> None:
    """Register the GRAFT tuner with PEFT and apply the patches that fit the installed versions (idempotent)."""
    peft_patches.register_graft_method()
    for patch in PATCHES:
        installed = version(patch.package)
        if Version(installed) in SpecifierSet(patch.versions):
            patch.apply()
        else:
            warnings.warn(
                f"peft-graft: {patch.name} was not patched: it was written for {patch.package}{patch.versions}, "
                f"and {patch.package} {installed} is installed, so {patch.without_it}.",
                RuntimeWarning,
                stacklevel=2,
            )
