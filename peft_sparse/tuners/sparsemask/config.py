"""Configuration of SparseMask: a sparse increment on a chosen support, or a learned mask over the weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.utils import PeftType

from peft_sparse.tuners.config_checks import (
    TargetedConfig,
    check_choice,
    check_fraction,
    check_ignored,
    check_int,
    check_number,
    check_save_dtype,
)

MODES = ("delta", "mask")
SELECTIONS = ("magnitude", "random", "gradient")


@dataclass
class SparseMaskConfig(TargetedConfig):
    """Sparse fine-tuning of the targeted weight matrices, in one of two modes.

    ``mode="delta"`` (SIFT, FISH, SpIEL, LT-SFT): each targeted weight ``W`` gets a trainable increment ΔW
    that is non-zero only on a fixed support holding a fraction ``density`` of its entries (a per-layer
    budget). The values start at zero (outputs unchanged at init); their gradient is computed directly at
    the support, so training costs memory in proportion to ``density``.

    ``mode="mask"`` ("How fine can fine-tuning be?", Radiya-Dixit & Wang 2020): learns which pretrained
    entries to zero, a fraction ``sparsity`` of each targeted weight; no weight value changes. Real-valued
    keep-scores are thresholded to a hard top-k mask in the forward, with straight-through gradients. The
    scores live only on a candidate set, the ``mask_candidates × (pruned count)`` lowest-magnitude entries
    (default 2: twice as many candidates as entries to prune), so their memory is small; ``None`` scores
    every entry. At init the mask prunes the lowest-magnitude entries. Saved as a bit-packed mask or the
    pruned indices, whichever is smaller.

    Args:
        mode: ``"delta"`` or ``"mask"``.
        density: Delta mode: fraction of each targeted weight that is trained, in (0, 1).
        sparsity: Mask mode: fraction of each targeted weight that is zeroed, in (0, 1).
        selection: Delta mode support: ``"magnitude"`` (largest |W|, the default: needs no data),
            ``"random"`` (seeded, drawn for each layer on its own) or ``"gradient"`` (largest Σ g² of the loss
            gradient over calibration batches: run ``peft_sparse.calibrate`` before training).
        block_size: Side of square support blocks (1 = unstructured). With blocks, ``density`` counts blocks
            of the block grid; a block size that does not divide a layer leaves partial blocks at its edges
            (clipped to the weight), so every layer works.
        seed: Seed of ``selection="random"``.
        mask_candidates: Mask mode: candidates per pruned entry (≥ 1), or ``None`` for all entries.
        save_dtype: Dtype of the saved values (``None``: the training dtype). ``"bfloat16"`` halves them.
        target_modules: Modules to train (names, suffixes or a regex). ``None``: every linear layer (``Linear``,
            GPT-2 ``Conv1D``, bitsandbytes 8/4-bit) inside the model's stack of transformer blocks.
    """

    mode: Literal["delta", "mask"] = field(default="delta", metadata={"help": "'delta' or 'mask'."})
    density: float = field(default=0.01, metadata={"help": "Delta mode: fraction of each weight trained."})
    sparsity: float = field(default=0.1, metadata={"help": "Mask mode: fraction of each weight zeroed."})
    selection: Literal["magnitude", "random", "gradient"] = field(
        default="magnitude", metadata={"help": "How the delta support is chosen."}
    )
    block_size: int = field(default=1, metadata={"help": "Side of square support blocks; 1 = unstructured."})
    seed: int = field(default=0, metadata={"help": "Seed for selection='random'."})
    mask_candidates: Optional[float] = field(
        default=2.0, metadata={"help": "Mask mode: scored candidates per pruned entry; None: all entries."}
    )
    save_dtype: Optional[str] = field(default=None, metadata={"help": "Dtype of saved values; None: as trained."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules to train; None: every linear layer in the transformer blocks."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.SPARSEMASK
        check_choice("mode", self.mode, MODES)
        check_fraction("density", self.density)
        check_fraction("sparsity", self.sparsity)
        check_choice("selection", self.selection, SELECTIONS)
        check_int("block_size", self.block_size, 1)
        check_int("seed", self.seed, 0)
        check_number("mask_candidates", self.mask_candidates, 1, strict=False, allow_none=True)
        if self.mode == "mask":
            if self.selection != "magnitude":
                raise ValueError("mode='mask' learns its own selection; `selection` applies to mode='delta' only")
            if self.block_size != 1:
                raise ValueError("mode='mask' prunes single entries; `block_size` applies to mode='delta' only")
            check_ignored("density", self.density, 0.01, "mode='delta' (mode='mask' takes `sparsity`)")
            check_ignored("seed", self.seed, 0, "selection='random'")
        else:
            check_ignored("sparsity", self.sparsity, 0.1, "mode='mask' (mode='delta' takes `density`)")
            check_ignored("mask_candidates", self.mask_candidates, 2.0, "mode='mask'")
            if self.selection != "random":
                check_ignored("seed", self.seed, 0, "selection='random'")
        check_save_dtype(self.save_dtype)
        self._check_targets()
