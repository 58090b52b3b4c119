"""Configuration of BitFit: train bias terms only (Ben Zaken et al., 2021)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from peft_sparse.tuners.config_checks import check_layers_to_transform, normalize_target_modules


@dataclass
class BitFitConfig(PeftConfig):
    """Train only bias terms — all of them, or the subset named by ``target_modules`` — plus the task head.

    Every targeted Linear, GPT-2 ``Conv1D``, bitsandbytes Linear or LayerNorm gets a trainable bias delta that
    starts at zero, so the model's outputs are unchanged at initialisation. Layers without a bias (LLaMA and
    Mistral projections) get one, also starting at zero; ``merge_and_unload`` creates the bias there.

    Args:
        target_modules: Module names or suffixes (a list) or a regex (a string) to train the bias of. ``None``
            (the default) means every Linear-like layer and every LayerNorm outside the task head, which is the
            BitFit paper's "all biases" setting. The paper's cheapest subset (query and MLP-intermediate biases)
            is ``["query", "intermediate.dense"]`` on BERT, ``["c_attn", "c_fc"]`` on GPT-2 and
            ``["q_proj", "up_proj"]`` on LLaMA.
        exclude_modules: Module names or a regex to leave out.
        modules_to_save: Modules trained and saved whole; for ``task_type="SEQ_CLS"`` PEFT adds the classifier.
        layers_to_transform / layers_pattern: Restrict to some transformer blocks (PEFT's generic matching).
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Modules whose bias is trained (names, suffixes or a regex); None: all Linear and norms."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules to leave out (names, suffixes or a regex)."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained and saved whole besides the biases (e.g. the head)."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only these block indices (needs a matching layers_pattern)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the ModuleList of blocks, e.g. 'layer' or 'h'."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.BITFIT
        normalize_target_modules(self)
        check_layers_to_transform(self)
