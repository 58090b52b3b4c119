"""Configuration of BitFit: train bias terms only (Ben Zaken et al., 2021)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.utils import PeftType

from peft_sparse.tuners.config_checks import TargetedConfig


@dataclass
class BitFitConfig(TargetedConfig):
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

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.BITFIT
        self._check_targets()
