"""The one place where peft_sparse extends PEFT: new ``PeftType`` members and ``register_peft_method`` calls.

PEFT 0.21 only registers methods whose name is already a member of its closed ``PeftType`` enum, and the
enum cannot be subclassed, so the members are added in place (see ``shared/notes/peft-internals.md``).
Everything here is idempotent: importing ``peft_sparse`` twice, or reloading it, registers nothing twice.
"""

from __future__ import annotations

import peft
from packaging.version import Version
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method

#: PEFT releases this package was tested against (lower bound inclusive, upper bound exclusive).
SUPPORTED_PEFT = (Version("0.21.0"), Version("0.22.0"))


def check_peft_version(version: str | None = None) -> None:
    """Raise ``ImportError`` when the installed PEFT is outside the tested range.

    The PeftType patch relies on PEFT internals that change between minor releases, so an untested PEFT is
    refused up front instead of failing later in an obscure place.
    """
    found = Version(version or peft.__version__)
    low, high = SUPPORTED_PEFT
    if not low <= found < high:
        raise ImportError(
            f"peft_sparse supports peft>={low},<{high}, but peft {found} is installed. "
            f"Install a tested release: pip install 'peft>={low},<{high}'."
        )


def _add_peft_type(name: str) -> PeftType:
    """Add ``name`` (upper case) to ``PeftType`` in place and return the member; a no-op if it exists."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


def register(name: str, config_cls: type, model_cls: type) -> PeftType:
    """Make ``name`` a PEFT method: a ``PeftType`` member plus PEFT's config/tuner/prefix mappings.

    The prefix is ``name + "_"`` and must equal ``model_cls.prefix``. Calling it again with the same classes does
    nothing; with different classes (a reloaded module) it re-points the mappings to the new classes.
    """
    if name != name.lower() or name.endswith("_"):
        raise ValueError(f"PEFT method names are lower case without a trailing '_', got {name!r}")
    member = _add_peft_type(name.upper())
    if member in PEFT_TYPE_TO_CONFIG_MAPPING:
        PEFT_TYPE_TO_CONFIG_MAPPING[member] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[member] = model_cls
        return member
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=f"{name}_")
    return member


def registered_methods() -> dict[str, str]:
    """Names of the peft_sparse methods known to PEFT right now, mapped to their state-dict prefixes."""
    from peft_sparse import tuners

    return {name: PEFT_TYPE_TO_PREFIX_MAPPING[PeftType[name.upper()]] for name in tuners.METHOD_NAMES}



class ConfigMapping(dict):
    """PEFT's ``peft_type -> config class`` mapping, whose failed lookup names the type and the known ones.

    PEFT indexes the mapping directly when it loads an ``adapter_config.json`` (``PeftConfig.from_pretrained``,
    ``PeftModel.from_pretrained``), so a misspelt ``peft_type`` gave a bare ``KeyError: 'SPARSMASK'``."""

    def __missing__(self, key):
        known = ", ".join(sorted(str(getattr(k, "value", k)) for k in self))
        raise KeyError(f"peft_type {str(getattr(key, 'value', key))!r} is not a PEFT method known here (check the "
                       f"spelling in adapter_config.json, or import the package that defines it). Known: {known}")


def explain_unknown_peft_types() -> None:
    """Put a ``ConfigMapping`` with the same entries wherever a loaded module holds PEFT's config mapping
    (idempotent). Every module is scanned, not only PEFT's: one that imported the mapping by name before
    peft_sparse would otherwise keep the old dict and miss the types registered afterwards. Modules imported
    later take the replacement from ``peft.mapping``."""
    import sys

    original = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING
    if isinstance(original, ConfigMapping):
        return
    replacement = ConfigMapping(original)
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attribute, value in list(namespace.items()):
            if value is original:
                setattr(module, attribute, replacement)


def register_all() -> None:
    """Register every peft_sparse tuner with PEFT (idempotent)."""
    from peft_sparse.tuners import METHODS

    explain_unknown_peft_types()
    for name, (config_cls, model_cls) in METHODS.items():
        register(name, config_cls, model_cls)
