"""Checks that several tuner configs share, so that each error reads the same everywhere."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from peft.config import PeftConfig


def check_fraction(name: str, value: Any) -> None:
    """``value`` must be a number in the open interval (0, 1)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value < 1.0:
        raise ValueError(f"`{name}` must be a fraction in (0, 1), got {value!r}")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; choose one of {choices}")


def normalize_target_modules(config: Any) -> None:
    """A list of target names becomes a sorted list without duplicates; an empty one is an error."""
    if isinstance(config.target_modules, (list, set, tuple)):
        config.target_modules = sorted(set(config.target_modules))
        if not config.target_modules or any(not isinstance(t, str) or not t for t in config.target_modules):
            raise ValueError(f"target_modules must be non-empty names (None for the default), got {config.target_modules!r}")


def check_layers_to_transform(config: Any) -> None:
    if getattr(config, "layers_to_transform", None) is not None and getattr(config, "layers_pattern", None) is None:
        raise ValueError("layers_to_transform needs layers_pattern (the name of the block list, e.g. 'layer')")


def check_save_dtype(value: Any) -> None:
    check_choice("save_dtype", value, (None, "float32", "bfloat16", "float16"))


@dataclass
class TargetedConfig(PeftConfig):
    """The module-selection fields that BitFit, SparseMask and DPS share, with their checks.

    Subclasses redeclare ``target_modules`` to document their own default and call ``self._check_targets()``
    from ``__post_init__``.
    """

    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to train."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules left out."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Modules trained whole."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Block indices."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Block list name."})

    def _check_targets(self) -> None:
        normalize_target_modules(self)
        check_layers_to_transform(self)
