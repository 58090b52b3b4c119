"""Configuration of Learners: a trainable slice of each FFN, chosen by priming (Vucetic et al., 2022)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.utils import PeftType

from peft_sparse.tuners.config_checks import SparseConfig, check_fraction, check_int, check_number

#: Block-relative names of (up/gate projections, down projection) of the common FFNs, tried in order.
FFN_LAYOUTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("intermediate.dense",), "output.dense"),  # BERT, RoBERTa, ELECTRA, MPNet
    (("ffn.lin1",), "ffn.lin2"),  # DistilBERT
    (("mlp.c_fc",), "mlp.c_proj"),  # GPT-2
    (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),  # LLaMA, Mistral, Qwen
    (("mlp.fc1",), "mlp.fc2"),  # OPT-style, Phi
)


@dataclass
class LearnerConfig(SparseConfig):
    """Learner modules: a fraction of each FFN's hidden nodes trains, the rest of the model stays frozen.

    What is implemented (the paper's body was not available; this is the project's reading of its abstract
    and of its predecessor FAR): in every targeted FFN a fraction ``learner_ratio`` of the hidden nodes
    becomes a Learner, a small dense module holding the increment of those nodes' rows of the up (and gate)
    projection with their biases, and of their columns of the down projection. The frozen FFN runs as it
    is; the Learner adds its rows' output to its hidden nodes and reads those nodes back for the down
    projection, so a step costs the frozen forward/backward plus two thin matmuls, with no weight-sized
    mask or gradient.

    Nodes are picked by priming, in ``peft_sparse.calibrate(model, batches)`` before the user's optimizer
    exists: ``priming_steps`` AdamW steps (``priming_lr``) in which every node of the targeted FFNs trains;
    the nodes whose weights changed most (squared norm of their rows' and column's change) become the
    Learners. The Learners keep their primed values; the other nodes are reset to the pretrained weights,
    so that the adapter stays small (only Learners are saved) and disabling it gives the base model exactly.
    ``priming_steps=0`` picks Learners without data: the nodes with the largest ‖up row‖·‖down column‖.

    Args:
        learner_ratio: Fraction of each FFN's hidden nodes that train, in (0, 1).
        priming_steps: Optimizer steps of priming (0: choose by weight magnitude, no calibration needed).
        priming_lr: Learning rate of priming's own AdamW.
        up_modules / down_module: Block-relative names of the FFN's up (and gate) projections and of its
            down projection. ``None`` recognises BERT, DistilBERT, GPT-2 and LLaMA-style FFNs.
        layers_pattern: Name (or suffix) of the block ``ModuleList``; ``None`` finds it.
    """

    learner_ratio: float = field(default=0.1, metadata={"help": "Fraction of each FFN's hidden nodes trained."})
    priming_steps: int = field(default=20, metadata={"help": "Priming steps in calibrate(); 0: by magnitude."})
    priming_lr: float = field(default=1e-4, metadata={"help": "Learning rate of priming."})
    up_modules: Optional[list[str]] = field(default=None, metadata={"help": "Block-relative up/gate names."})
    down_module: Optional[str] = field(default=None, metadata={"help": "Block-relative down projection name."})
    layers_pattern: Optional[str] = field(default=None, metadata={"help": "Name of the block ModuleList."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Filled in from the FFN layout; not set by hand."}
    )
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Modules trained whole."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LEARNER
        check_fraction("learner_ratio", self.learner_ratio)
        check_int("priming_steps", self.priming_steps, 0)
        check_number("priming_lr", self.priming_lr, 0.0)
        if (self.up_modules is None) != (self.down_module is None):
            raise ValueError("Give both `up_modules` and `down_module`, or neither")
        if self.up_modules is not None:
            if isinstance(self.up_modules, str) or not self.up_modules or any(
                not isinstance(m, str) or not m for m in self.up_modules
            ):
                raise ValueError(f"`up_modules` must be a non-empty list of module names, got {self.up_modules!r}")
            if not isinstance(self.down_module, str) or not self.down_module:
                raise ValueError(f"`down_module` must be a module name, got {self.down_module!r}")
            self.up_modules = list(self.up_modules)
