"""What every peft_sparse config shares: value checks that read the same everywhere, the module-selection
fields, and the model card that ``save_pretrained`` / ``push_to_hub`` write.

PEFT looks a saved adapter's method up with ``PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]`` before it reads any other
field of ``adapter_config.json``, so loading an adapter without ``import peft_sparse`` fails with a bare
``KeyError: 'SPARSEMASK'`` that no config field can change. The model card (README.md, written beside the
adapter) is where the loading instructions live; ``adapter_config.json`` also records ``peft_sparse_version``.
"""

from __future__ import annotations

import os
import re
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Optional, Union

from peft.config import PeftConfig


def check_fraction(name: str, value: Any) -> None:
    """``value`` must be a number in the open interval (0, 1)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value < 1.0:
        raise ValueError(f"`{name}` must be a fraction in (0, 1), got {value!r}")


def check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    """``value`` must be an integer (not a bool, a float or a string) of at least ``minimum``."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
        raise ValueError(f"`{name}` must be {kind}{' (or None)' if allow_none else ''}, got {value!r}")


def check_number(name: str, value: Any, minimum: float, strict: bool = True, allow_none: bool = False) -> None:
    """``value`` must be a real number (not a bool or a string) above ``minimum`` (or at least, if not strict)."""
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise ValueError(f"`{name}` must be a number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"`{name}` must be {'>' if strict else '≥'} {minimum}, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; choose one of {choices}")


def check_ignored(name: str, value: Any, default: Any, applies_to: str) -> None:
    """A field that the chosen mode ignores must keep its default: a changed value would be silently unused."""
    if value != default:
        raise ValueError(f"`{name}={value!r}` applies to {applies_to} only; leave it unset")


def normalize_target_modules(config: Any) -> None:
    """A list of target names becomes a sorted list without duplicates; an empty one is an error."""
    if isinstance(config.target_modules, (list, set, tuple)):
        config.target_modules = sorted(set(config.target_modules))
        if not config.target_modules or any(not isinstance(t, str) or not t for t in config.target_modules):
            raise ValueError(f"target_modules must be non-empty names (None for the default), got {config.target_modules!r}")
    elif config.target_modules is not None and not isinstance(config.target_modules, str):
        raise ValueError(f"target_modules must be a list of names, a regex or 'all-linear', got {config.target_modules!r}")


def check_layers_to_transform(config: Any) -> None:
    """Block indices (PEFT's ``layers_to_transform``): a non-negative int or a non-empty list of them. Whether each
    exists is checked against the model when the adapter is injected."""
    layers = getattr(config, "layers_to_transform", None)
    if layers is None:
        return
    items = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
    if not isinstance(items, (list, tuple)) or not items or any(
        not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in items
    ):
        raise ValueError(f"`layers_to_transform` must be a block index or a non-empty list of them, got {layers!r}")


def check_save_dtype(value: Any) -> None:
    check_choice("save_dtype", value, (None, "float32", "bfloat16", "float16"))


@dataclass
class SparseConfig(PeftConfig):
    """Base of every peft_sparse config: the version that wrote it, where it was loaded from, and the model card."""

    peft_sparse_version: Optional[str] = field(
        default=None, metadata={"help": "peft_sparse release that saved the adapter (loading needs `import peft_sparse`)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.peft_sparse_version is None:
            from peft_sparse import __version__

            self.peft_sparse_version = __version__

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        # Remembered so that the tuner can read a local checkpoint before injecting its adapter.
        folder = pretrained_model_name_or_path if subfolder is None else os.path.join(pretrained_model_name_or_path, subfolder)
        if os.path.isdir(str(folder)):
            config._loaded_from = str(folder)
        return config

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        super().save_pretrained(save_directory, **kwargs)
        write_model_card(self, save_directory)

    def non_default_settings(self) -> dict[str, Any]:
        """The method's own fields that differ from their defaults (for the model card)."""
        skipped = {f.name for f in fields(PeftConfig)} | {"peft_sparse_version"}
        settings = {}
        for f in fields(self):
            if f.name in skipped:
                continue
            default = f.default if f.default is not MISSING else None
            value = getattr(self, f.name)
            if value != default:
                settings[f.name] = value
        for name in ("target_modules", "modules_to_save"):
            value = getattr(self, name, None)
            if value is not None:
                settings[name] = sorted(value) if isinstance(value, (set, list)) else value
        return settings


CARD_MARKER = "<!-- peft_sparse adapter: {name} -->"


def write_model_card(config: SparseConfig, save_directory: str) -> None:
    """Add (or refresh) this adapter's section in the model card PEFT wrote beside it: the method, its settings,
    the ``peft_sparse`` tags, and the lines that load it."""
    from huggingface_hub import ModelCard, ModelCardData

    method = config.peft_type.value.lower() if hasattr(config.peft_type, "value") else str(config.peft_type).lower()
    folder = os.path.abspath(save_directory)
    card_path = os.path.join(folder, "README.md")
    subfolder = None
    if not os.path.exists(card_path) and os.path.exists(os.path.join(os.path.dirname(folder), "README.md")):
        card_path = os.path.join(os.path.dirname(folder), "README.md")  # a named adapter saved in a subfolder
        subfolder = os.path.basename(folder)
    card = ModelCard.load(card_path) if os.path.exists(card_path) else ModelCard.from_template(ModelCardData())
    tags = set(card.data.tags or []) | {"peft_sparse", f"peft_sparse:{method}", "peft"}
    card.data.tags = sorted(tags)
    card.data["library_name"] = card.data.get("library_name") or "peft"
    name = subfolder or "default"
    marker = CARD_MARKER.format(name=name)
    settings = "\n".join(f"- `{k}`: `{v!r}`" for k, v in config.non_default_settings().items()) or "- (defaults)"
    load_args = '"<this folder or repo id>"' + (f', subfolder="{subfolder}", adapter_name="{subfolder}"' if subfolder else "")
    section = f"""{marker}
## peft_sparse adapter: {type(config).__name__.removesuffix("Config")}{f" ({subfolder})" if subfolder else ""}

This adapter was trained with **peft_sparse** {config.peft_sparse_version} (method `{method}`), a package that adds
sparse and selective fine-tuning methods to PEFT. PEFT loads it only after `import peft_sparse`; without the
import it raises `KeyError: '{method.upper()}'`.

peft_sparse is not published on PyPI: install it from its source checkout, or from a wheel built there.

```bash
pip install -e <peft_sparse checkout>
# or: pip wheel --no-deps <peft_sparse checkout> -w dist && pip install dist/peft_sparse-*.whl
```

```python
import peft_sparse  # registers the peft_sparse methods with PEFT: import it before loading
from peft import PeftModel

model = PeftModel.from_pretrained(base_model, {load_args})
```

Settings:
{settings}
<!-- end peft_sparse adapter: {name} -->"""
    text = card.text
    pattern = re.compile(re.escape(marker) + r".*?<!-- end peft_sparse adapter: " + re.escape(name) + " -->", re.S)
    card.text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    card.save(card_path)


@dataclass
class TargetedConfig(SparseConfig):
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
