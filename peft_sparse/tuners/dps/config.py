"""Configuration of DPS: dynamic parameter selection (Zhang et al., NeurIPS 2022)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.utils import PeftType

from peft_sparse.tuners.config_checks import TargetedConfig, check_choice, check_fraction, check_int, check_save_dtype

VARIANTS = ("dense", "mix")
MASKINGS = ("strict", "gradient-only")
SCOPES = ("targets", "model")


@dataclass
class DPSConfig(TargetedConfig):
    """Dynamic parameter selection: alternate stages that update the whole weight and a chosen subnetwork.

    Each targeted weight gets a trainable increment ΔW (zero at init). Training alternates stages of
    ``update_ratio × total steps`` optimizer steps. In stage I every entry is updated (``variant="dense"``),
    or a Mixout-style random subset of input columns (``variant="mix"``, each column kept with probability
    ``keep_ratio``), while a gradient-accumulation score Σg² is kept (for ``mix`` divided by how often each
    entry was sampled, and damped by exp(−count/U) when stages last 50 steps or more, as in the authors'
    code). In stage II only the ``keep_ratio`` highest-scoring entries of each weight matrix are updated.

    ``keep_ratio`` is the fraction *updated*. The authors' ``--reserve_p`` is the fraction dropped:
    ``reserve_p=0.3`` is ``keep_ratio=0.7``.

    ``masking="strict"`` (the default) guarantees that entries outside the stage-II subnetwork do not move
    at all: their gradient is masked and, after each optimizer step, any change that AdamW's momentum or
    weight decay made to them is undone. ``masking="gradient-only"`` masks the gradient only, as the
    authors' code does, so momentum and weight decay still move the "frozen" entries.

    ``scope="targets"`` (the default, PEFT's scope) trains only the targeted weight matrices (and the task head).
    ``scope="model"`` is the authors' scope: DPS on every linear weight outside the head (``target_modules``
    defaults to PEFT's ``"all-linear"``, which includes BERT's pooler), while the biases of those layers, every
    norm and every embedding train densely at every step, as in the authors' code (they pass the classifier's
    weight through DPS too; here the head is PEFT's ``modules_to_save`` and trains densely). Its adapter is as
    large as the model's trained part.

    The schedule needs the run's length: the ``SparseTrainerCallback`` reads it from the ``Trainer``; a plain
    loop sets ``total_step`` and calls ``model.base_model.update_and_allocate(step)`` after each
    ``optimizer.step()``, before ``optimizer.zero_grad()``.

    Args:
        variant: ``"dense"`` or ``"mix"`` (stage I).
        keep_ratio: Fraction of each weight matrix updated in stage II (and kept per column in mix stage I).
        update_ratio: Length of a stage as a fraction of the total steps.
        total_step: Total optimizer steps (plain loops; the Trainer callback fills it in).
        masking: ``"strict"`` or ``"gradient-only"``.
        scope: ``"targets"`` or ``"model"`` (see above).
        save_dtype: Dtype of the saved increments (``None``: the training dtype).
        target_modules: Modules to train. ``None``: every linear layer inside the transformer blocks
            (``scope="targets"``) or every linear layer outside the head (``scope="model"``).
    """

    variant: Literal["dense", "mix"] = field(default="dense", metadata={"help": "'dense' or 'mix' stage I."})
    keep_ratio: float = field(default=0.7, metadata={"help": "Fraction of each weight updated in stage II."})
    update_ratio: float = field(default=0.05, metadata={"help": "Stage length as a fraction of total steps."})
    total_step: Optional[int] = field(default=None, metadata={"help": "Total optimizer steps (plain loops)."})
    masking: Literal["strict", "gradient-only"] = field(default="strict", metadata={"help": "Stage-II masking."})
    scope: Literal["targets", "model"] = field(default="targets", metadata={"help": "'targets' or 'model'."})
    save_dtype: Optional[str] = field(default=None, metadata={"help": "Dtype of saved increments."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules to train; None: every linear layer in the transformer blocks."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.DPS
        check_choice("variant", self.variant, VARIANTS)
        check_choice("masking", self.masking, MASKINGS)
        check_choice("scope", self.scope, SCOPES)
        check_fraction("keep_ratio", self.keep_ratio)
        check_fraction("update_ratio", self.update_ratio)
        check_int("total_step", self.total_step, 1, allow_none=True)
        check_save_dtype(self.save_dtype)
        self._check_targets()

    def stage_length(self) -> int:
        """U: optimizer steps per stage."""
        if self.total_step is None:
            raise ValueError(
                "DPS needs the run's length: train with the transformers Trainer and "
                "peft_sparse.SparseTrainerCallback, or set DPSConfig(total_step=...) for a plain loop"
            )
        return max(1, int(self.total_step * self.update_ratio))
