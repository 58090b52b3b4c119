"""Configuration of LayerSelect: fine-tune only the most critical transformer blocks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.utils import PeftType

from peft_sparse.tuners.config_checks import SparseConfig, check_choice, check_int, normalize_target_modules

SELECTIONS = ("gradient",)


@dataclass
class LayerSelectConfig(SparseConfig):
    """Train whole transformer blocks — chosen by index, or the ``num_layers`` most critical ones — and the head.

    Radiya-Dixit & Wang (2020) found that "it suffices to fine-tune only the most critical layers". Give the
    blocks by index with ``layers=[...]``, or let ``peft_sparse.calibrate`` measure them: with ``num_layers=k``
    and ``selection="gradient"`` every block is scored by the squared norm of the loss gradient of its
    parameters, summed over the calibration batches, and the ``k`` highest-scoring blocks are trained. After
    calibration ``layers`` holds the choice and ``layer_scores`` the scores, so the saved config reloads onto
    exactly the same blocks.

    Each parameter of each chosen module gets a dense trainable delta that starts at zero: outputs are
    unchanged at init, ``disable_adapter()`` gives the base model exactly, and the saved adapter holds only
    the deltas of the chosen blocks.

    Args:
        layers: Block indices to train (0-based, in the model's block list).
        num_layers: How many blocks to choose by ``selection`` during ``peft_sparse.calibrate``.
        selection: Criterion for ``num_layers``; ``"gradient"`` (squared gradient norm per block).
        layers_pattern: Qualified name (or suffix) of the block ``ModuleList``, e.g. ``"encoder.layer"``,
            ``"h"``, ``"layers"``. ``None`` finds it: the list of identical blocks holding most parameters.
        target_modules: Within the chosen blocks, only these modules (names, suffixes or a regex). ``None``:
            every module that holds parameters (linear layers and norms), i.e. the whole block.
        exclude_modules: Modules to leave out.
        modules_to_save: Modules trained and saved whole (PEFT adds the classifier for ``task_type="SEQ_CLS"``).
        layer_scores: Filled by calibration: the score of every block (read-only information).
    """

    layers: Optional[list[int]] = field(default=None, metadata={"help": "Indices of the blocks to train."})
    num_layers: Optional[int] = field(default=None, metadata={"help": "Number of blocks chosen by calibration."})
    selection: Literal["gradient"] = field(default="gradient", metadata={"help": "Criterion for num_layers."})
    layers_pattern: Optional[str] = field(default=None, metadata={"help": "Name of the block ModuleList."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules inside the chosen blocks to train; None: all of them."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules left out."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Modules trained whole."})
    layer_scores: Optional[list[float]] = field(default=None, metadata={"help": "Block scores from calibration."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LAYERSELECT
        # A calibrated config carries both: `num_layers` asked for, `layers` chosen (with their `layer_scores`).
        calibrated = self.layer_scores is not None
        if (self.layers is None and self.num_layers is None) or (
            self.layers is not None and self.num_layers is not None and not calibrated
        ):
            raise ValueError("Give exactly one of `layers` (block indices) or `num_layers` (chosen by calibration)")
        if self.layers is not None:
            if isinstance(self.layers, int) or not self.layers:
                raise ValueError(f"`layers` must be a non-empty list of block indices, got {self.layers!r}")
            if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in self.layers):
                raise ValueError(f"`layers` must hold non-negative integers, got {self.layers!r}")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"`layers` has duplicates: {self.layers!r}")
            self.layers = sorted(self.layers)
        check_int("num_layers", self.num_layers, 1, allow_none=True)
        check_choice("selection", self.selection, SELECTIONS)
        normalize_target_modules(self)
