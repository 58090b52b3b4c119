"""Behaviour every peft_sparse tuner shares, written once.

``SparseTunerLayer`` (a PEFT ``BaseTunerLayer``): the disabled / merged forward; the "base output plus each
adapter's increment" forward (``add_increment``), which quantized and hooked bases take and which a layer that folds
its increment into the weight overrides; the mixed-adapter batch (``adapter_names=``: the base product once, each
row group's increment on its rows; ``tuners/mixed_batch.py`` passes the names); ``get_delta_weight`` and the one
merge routine (read the base parameter, dequantizing a quantized weight, add, write back, re-quantizing), which
saves what it overwrites so that unmerging is exact (``tuners/merging.py``); the dtype adapters train in; and the
hooks through which each layer writes and reads its own checkpoint entries (also for hot-swap, ``serving.py``).

``SparseTunerModel`` (a PEFT ``BaseTuner``) adds what a demanding PEFT user expects and PEFT leaves to each
method:

* the tuner works on its own copy of the config, so the user's config object is never changed;
* ``target_modules="all-linear"`` through PEFT's own expansion, default targets per architecture, and
  ``layers_to_transform`` checked against the model (every listed block must exist);
* every check runs before the first module is replaced, so bad input leaves the model as it was;
* checkpoints are written and read by the layers themselves (compact formats), checked before anything is loaded,
  and rolled back on failure (``tuners/loading.py``);
* the guard that refuses to train an adapter whose selection has not been measured yet (the calibration protocol
  itself is in ``peft_sparse/calibration.py``);
* ``merge_and_unload(safe_merge=True)`` checks every layer before it merges any;
* ``set_total_steps`` / ``update_and_allocate`` on every tuner (no-ops where nothing is scheduled), so that a
  training loop written for one peft_sparse method runs with any other;
* mixed-adapter batches in ``forward`` and ``generate`` (``_enable_peft_forward_hooks``) and
  ``add_weighted_adapter`` (``tuners/combine.py``), with PEFT LoRA's semantics.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from peft.config import PeftConfig
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _ExcludedModule,
    _maybe_include_all_linear_layers,
    check_adapters_to_merge,
)
from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND, AuxiliaryTrainingWrapper
from peft.utils.constants import DUMMY_TARGET_MODULES
from peft.utils.integrations import _skip_init_on_device
from peft.utils.quantization_utils import resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_sparse import distributed, quantized
from peft_sparse.calibration import CalibrationRequiredError, CalibrationSession
from peft_sparse.modules import (
    block_index,
    dense_weight,
    find_layer_stack,
    first_of,
    head_module_names,
    is_linear,
    is_norm,
    is_under,
    linear_shape,
)
from peft_sparse.kernels.function import WeightSource
from peft_sparse.tuners import combine, loading, merging, mixed_batch


# ----------------------------------------------------------------------------------------------------- layers


class SparseTunerLayer(nn.Module, BaseTunerLayer):
    """What every peft_sparse tuner layer shares.

    A subclass implements ``adapted_forward`` (the forward with its active adapters) and ``get_delta_weight``
    (PEFT's convention: the adapter's dense increment of the weight, ``(out, in)``, or None); layers that change
    other parameters override ``delta_parameters``. Merge and unmerge come from here, through one routine
    (``_add_to_base_parameter``). Layers with a compact checkpoint format override ``write_checkpoint`` /
    ``read_checkpoint``.
    """

    #: Whether a mixed batch may fold each group's sparse increment into the weight (a float weight in place, a
    #: quantized one's dequantized buffer; see ``mixed_batch_forward``); False always takes the base product plus
    #: sparse products.
    fold_mixed_batches: bool = True
    #: Fewest tokens per row group for folding: below it (generation's one token a row) a group's sparse product
    #: costs less than writing its support into the weight plus a smaller product. SmolLM2, fp32, 2 CPU threads
    #: (benchmarks/serving.py, mixed phase): at 64 tokens a group (8 adapters in 8 x 64 tokens) the products took
    #: 1,102 ms against the fold's 1,225; at 128 tokens (4 adapters) the fold 960 ms against 1,148.
    fold_min_tokens: int = 128

    def _init_tuner_layer(self, base_layer: nn.Module, adapter_name: str) -> None:
        self.base_layer = base_layer
        # PEFT's backend for quantized layers (bitsandbytes 8/4-bit...): dequantize / re-quantize on merge.
        self.quantization_backend = resolve_quantization_backend(base_layer)
        _keep_bnb_4bit_weight_readable(base_layer)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        # Per merged adapter, what its merge overwrote in each base parameter (``merging.py``): the unmerge puts it
        # back exactly. Registered with PEFT (``other_param_names``), so delete_adapter frees it.
        self.merge_saved: dict[str, dict[str, merging.Saved]] = {}
        self.in_features, self.out_features = _io_features(base_layer)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "merge_saved" not in cls.other_param_names:
            cls.other_param_names = (*cls.other_param_names, "merge_saved")

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            self._check_mixed_batch(x, adapter_names)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self.mixed_batch_forward(x, adapter_names, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self.adapted_forward(x, *args, **kwargs)

    def is_ready(self, adapter_name: str) -> bool:
        """Whether this layer holds ``adapter_name`` and can run it (a support still waiting for calibration cannot)."""
        return self.has_adapter(adapter_name)

    def ready_adapters(self) -> list[str]:
        """The active adapters this layer holds and can run."""
        return [a for a in self.active_adapters if self.is_ready(a)]

    # ---------------------------------------------------------------------------------- mixed-adapter batches
    def _may_fold_mixed_batch(self) -> bool:
        """A weight may change between the groups' products only where nothing records it: no autograd, a linear
        base running no hooks, and no merged adapter (a quantized base folds into a dequantized buffer of its own,
        where ``fold_source`` offers one)."""
        return (
            self.fold_mixed_batches and not torch.is_grad_enabled() and not self.merged
            and is_linear(self.get_base_layer()) and not self.base_is_hooked()
        )

    def _folded_mixed_batch(self, x: torch.Tensor, groups: list[tuple[str, Any]], *args: Any, **kwargs: Any):
        """Each group's rows through one product with the group's sparse increment folded into the weight.

        Float bases: the weight itself, in place; the support's entries are saved first and written back at the end,
        so the weight is bit-equal to what it was (``merging.py``). Quantized bases: the weight dequantized once for
        the whole batch into a fresh buffer (``fold_source``), as the layer's own product would, and one float
        product per group. Adapters on one support follow each other with one rewrite of the saved entries; others
        restore first. No sparse product, no weight-sized copy on float bases. None (the caller takes the sparse
        products) unless every adapter's increment is a sparse weight increment. Not for several threads running
        one model at once: each sees the weight of the group in flight.
        """
        increments = {a: self.merge_increments(a) for a, _ in groups if a != "__base__" and self.is_ready(a)}
        if not increments or any(
            set(i) != {"weight"} or not isinstance(i["weight"], merging.SparseIncrement) for i in increments.values()
        ):
            return None
        base = self.get_base_layer()
        if self.is_quantized:
            fresh = self.fold_source(x)
            if not callable(fresh):
                return None  # the layer must run its own product (8-bit inference, CUDA 4-bit on few tokens)
            inputs, bias = self.fold_inputs(x)
            weight = fresh(inputs.dtype)  # a buffer of this call's own: nothing to put back

            def product(part: torch.Tensor) -> torch.Tensor:
                return F.linear(part, weight, bias).to(x.dtype)
        else:
            inputs, weight = x, base.weight.data

            def product(part: torch.Tensor) -> torch.Tensor:
                return base(part, *args, **kwargs)

        sparse = {a: self._in_storage_layout("weight", i["weight"]) for a, i in increments.items()}
        whole = len(groups) == 1
        result = None
        saved: Optional[merging.SavedEntries] = None  # what the increment now in the weight overwrote
        try:
            for adapter, rows in groups:
                rows = rows if isinstance(rows, slice) else rows.to(x.device)
                part = inputs if whole else mixed_batch.take_rows(inputs, rows)
                if adapter in sparse:
                    saved = merging.fold_next(weight, saved, sparse[adapter])
                elif saved is not None:
                    saved.restore(weight)
                    saved = None
                out = product(part)
                if whole:
                    return out
                if result is None:
                    result = out.new_empty((x.shape[0], *out.shape[1:]))
                mixed_batch.put_rows(result, rows, out)
        finally:
            if saved is not None and not self.is_quantized:
                saved.restore(weight)
        return result

    def _rewrite_saved(self, saved: dict[str, merging.Saved], increments: dict[str, merging.Increment]) -> bool:
        """Where ``increments`` are sparse on exactly the entries ``saved`` holds, set those entries to the saved base
        values plus the increments (one scatter per parameter, exact) and return True; else change nothing."""
        new = {name: self._in_storage_layout(name, inc) for name, inc in increments.items()}
        base = self.get_base_layer()
        if new.keys() != saved.keys() or not all(merging.can_rewrite(getattr(base, n), saved[n], new[n]) for n in new):
            return False
        with torch.no_grad():
            for name, increment in new.items():
                merging.rewrite(getattr(base, name).data, saved[name], increment)
        return True

    def _check_mixed_batch(self, x: torch.Tensor, adapter_names: list[str]) -> None:
        """PEFT LoRA's checks of ``adapter_names`` (``LoraLayer._check_forward_args``)."""
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )

    def mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Row ``i`` of the batch with adapter ``adapter_names[i]`` (``"__base__"``: none), PEFT's mixed batch.

        The base product runs once for the whole batch; each group of rows then adds its own adapter's increment
        (``add_increment``) on its rows only, so the increments cost one batch's worth in total, whatever the number
        of adapters. Adapters this layer does not hold (or cannot run yet) leave their rows at the base output.

        Sparse weight increments (SparseMask), without autograd, take a faster route instead
        (``_folded_mixed_batch``) when the groups hold ``fold_min_tokens`` tokens or more: a group's sparse product
        then costs more than writing its support into the weight and running a smaller dense product.
        """
        groups = mixed_batch.row_groups(adapter_names)
        tokens_per_group = x.numel() // max(1, x.shape[-1] * len(groups))
        if tokens_per_group >= self.fold_min_tokens and self._may_fold_mixed_batch():
            folded = self._folded_mixed_batch(x, groups, *args, **kwargs)
            if folded is not None:
                return folded
        result = self.base_layer(x, *args, **kwargs)
        for adapter, rows in groups:
            if adapter == "__base__" or not self.is_ready(adapter):
                continue
            if isinstance(rows, slice) and rows == slice(0, len(adapter_names)):
                result = self.add_increment(result, adapter, x)
            else:
                rows = rows if isinstance(rows, slice) else rows.to(x.device)
                part = self.add_increment(mixed_batch.take_rows(result, rows), adapter, mixed_batch.take_rows(x, rows))
                mixed_batch.put_rows(result, rows, part)
        return result

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The forward with the active adapters. Default: ``base(x)`` plus each adapter's increment; layers that fold
        their increment into the weight override it for the bases that allow that."""
        return self.base_plus_increments(x, self.ready_adapters(), *args, **kwargs)

    def base_plus_increments(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base(x)`` with each of ``adapters``' output increments added (``add_increment``)."""
        result = self.base_layer(x, *args, **kwargs)
        for adapter in adapters:
            result = self.add_increment(result, adapter, x)
        return result

    def add_increment(self, result: torch.Tensor, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``result`` (the base output for input ``x``, or rows of it) plus what ``adapter_name`` adds to it."""
        raise NotImplementedError(f"{type(self).__name__} must implement add_increment")

    def base_layer_can_be_fsdp_unit(self) -> bool:
        """Whether FSDP may shard ``base_layer`` as a unit of its own. FSDP gathers a unit's parameters only around
        the unit's own forward; every layer that runs a hooked base layer's own forward (``fold_source`` is None for
        it) allows it, a layer that reads the base parameters itself does not."""
        return True

    @property
    def is_quantized(self) -> bool:
        """Whether the base layer's weight is quantized (PEFT's quantization backend: bitsandbytes, HQQ...)."""
        return self.quantization_backend is not None

    def adapter_dtype(self) -> torch.dtype:
        """The dtype adapters are created in: fp32 on quantized bases (their own dtype is not a float one), otherwise
        the base weight's dtype. ``get_peft_model(..., autocast_adapter_dtype=True)``, PEFT's default, then upcasts
        bf16/fp16 values to fp32 (``SparseTunerModel._cast_adapter_dtype``); with ``False`` they train in the
        base's dtype."""
        if self.is_quantized:
            return torch.float32
        weight = getattr(self.get_base_layer(), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point:
            return weight.dtype
        return torch.float32

    def fold_source(self, x: torch.Tensor) -> WeightSource:
        """Where a weight increment can be folded into the base layer's own product for input ``x``: its float weight
        as ``(out, in)`` (folded in place), a callable that dequantizes a quantized weight into a fresh buffer
        (``peft_sparse.quantized``), or None when the base layer must run its own forward and the increment goes
        beside it: hooked bases (Accelerate offloading, FSDP units, user hooks), 8-bit inference, CUDA 4-bit inference
        on few tokens."""
        base = self.get_base_layer()
        if self.base_is_hooked():
            return None
        if self.is_quantized:
            return quantized.fresh_weight(base, x)
        return dense_weight(base)

    def base_is_hooked(self) -> bool:
        """Whether hooks run around the base layer's forward (Accelerate offloading, an FSDP unit, user hooks): it
        must then run its own forward, and increments go beside it."""
        base = self.get_base_layer()
        return bool(base._forward_hooks or base._forward_pre_hooks) or hasattr(base, "_hf_hook")

    def fold_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``x`` and the base bias in the dtype the base layer computes in (a quantized layer's compute dtype)."""
        base = self.get_base_layer()
        bias = base.bias
        if not self.is_quantized:
            return x, bias
        dtype = quantized.compute_dtype(base, x)
        return x.to(dtype), None if bias is None else bias.to(dtype)

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in getattr(self, self.adapter_layer_names[0])

    def _adapter_tensors(self, adapter_name: str) -> list[torch.Tensor]:
        tensors = []
        for attribute in self.adapter_layer_names:
            holder = getattr(self, attribute)
            if adapter_name in holder:
                item = holder[adapter_name]
                tensors += list(item.parameters()) if isinstance(item, nn.Module) else [item]
        return tensors

    # -------------------------------------------------------------------------------------------- deltas
    def get_delta_weight(self, adapter_name: str) -> Optional[torch.Tensor]:
        """The adapter's increment of the base weight as a dense ``(out, in)`` tensor (None: it changes none)."""
        raise NotImplementedError

    def delta_parameters(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """``{base parameter name: increment}`` of the adapter (the weight as ``(out, in)``), no gradient."""
        delta = self.get_delta_weight(adapter_name)
        return {} if delta is None else {"weight": delta.detach()}

    def set_increments(self, adapter_name: str, increments: dict[str, torch.Tensor], sources: list[str]) -> None:
        """The inverse of ``delta_parameters``: make ``adapter_name``'s increments ``increments`` (same layout), on the
        union of the ``sources``' structure where the method has one (SparseMask's support, Learner nodes). Used by
        ``add_weighted_adapter``."""
        raise NotImplementedError(f"{type(self).__name__} must implement set_increments")

    # ------------------------------------------------------------------------------------------- merging
    def non_finite_adapters(self, adapter_names: Optional[list[str]] = None) -> list[str]:
        """Of the adapters a merge would fold in, those holding NaNs or infinities."""
        wanted = adapter_names if adapter_names is not None else self.active_adapters
        return [
            a for a in wanted
            if a not in self.merged_adapters and self.has_adapter(a)
            and not all(bool(torch.isfinite(t).all()) for t in self._adapter_tensors(a))
        ]

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the adapters' changes into the base layer, saving what each merge overwrites (the unmerge gives it
        back exactly). A quantized weight is re-quantized: the merged layer then differs from the unmerged one by
        the quantization error."""
        self._refuse_sharded("merge")
        if safe_merge and self.non_finite_adapters(adapter_names):
            bad = self.non_finite_adapters(adapter_names)
            raise ValueError(f"NaNs or infinities in adapter(s) {bad} of {type(self).__name__}; nothing was merged")
        for adapter in check_adapters_to_merge(self, adapter_names):
            if not self.has_adapter(adapter):
                continue
            with torch.no_grad():
                self.merge_saved[adapter] = {
                    name: self._add_to_base_parameter(name, increment)
                    for name, increment in self.merge_increments(adapter).items()
                }
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Undo every merge, last first, by writing back what each overwrote: the base parameters are then exactly
        as before the first merge (no ``W + Δ − Δ`` rounding)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self._refuse_sharded("unmerge")
        while self.merged_adapters:
            self._restore_base(self.merged_adapters.pop())

    def unmerge_down_to(self, adapter_name: str) -> list[str]:
        """Unmerge the adapters merged after ``adapter_name`` and then ``adapter_name`` itself (merges are undone
        last first); return them in merge order, so that ``merge(adapter_names=...)`` can fold them in again."""
        position = self.merged_adapters.index(adapter_name)
        undone = self.merged_adapters[position:]
        while len(self.merged_adapters) > position:
            self._restore_base(self.merged_adapters.pop())
        return undone

    def swap_merged(self, adapter_name: str, install: Callable[[], None]) -> None:
        """Replace a merged adapter's tensors (``install()``) and keep it merged, exactly (hot-swap on a merged model).

        Where it is the last merge, its increments are sparse on the same support as before (SparseMask adapters
        trained with the default magnitude selection share their supports) and nothing of it is read from the base,
        one scatter per parameter writes the saved base entries plus the new values. Otherwise the layer unmerges
        down to it (exactly), installs, re-reads what the adapter derives from the base, and merges again.
        """
        if self.merged_adapters[-1:] == [adapter_name] and not self.derives_from_base(adapter_name):
            install()
            if self._rewrite_saved(self.merge_saved[adapter_name], self.merge_increments(adapter_name)):
                return
            self.merged_adapters.pop()
            self._restore_base(adapter_name)  # what the old merge saved: independent of the installed tensors
            self.merge(adapter_names=[adapter_name])
            return
        merged_again = self.unmerge_down_to(adapter_name)
        install()
        self.refresh_from_base(adapter_name)
        self.merge(adapter_names=merged_again)

    def derives_from_base(self, adapter_name: str) -> bool:
        """Whether the adapter's increment is computed from the base weights (SparseMask's masks: ``−W``)."""
        return False

    def refresh_from_base(self, adapter_name: str) -> None:
        """Re-read what ``adapter_name`` derives from the base weights, after a hot-swap decoded it while another
        merge had changed them (nothing, except where a layer reads the base: SparseMask's masks)."""

    def merge_increments(self, adapter_name: str) -> dict[str, merging.Increment]:
        """What a merge adds to each base parameter: ``delta_parameters``, or a ``merging.SparseIncrement`` where
        the layer holds a sparse one (so that neither the merge nor what it saves is weight-sized)."""
        return self.delta_parameters(adapter_name)

    def _refuse_sharded(self, what: str) -> None:
        """Merging writes into the base parameters, which FSDP holds as DTensor shards between forwards."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return  # no process group, no DTensor
        sharded = [n for n, p in self.named_parameters() if distributed.is_dtensor(p)]
        if sharded:
            raise ValueError(
                f"Cannot {what} {type(self).__name__}: its parameters are FSDP shards (DTensor: {sharded[:3]}). "
                "Gather the adapter first (save_pretrained from the gathered state dict, then load it in one "
                "process) and merge there."
            )

    def _add_to_base_parameter(self, name: str, increment: merging.Increment) -> merging.Saved:
        """Add ``increment`` to the base layer's parameter ``name`` and return what it overwrote: the one merge
        routine.

        A float parameter is changed in place where the increment touches it, those entries saved first
        (``merging.add_saving``). A quantized weight is dequantized by PEFT's backend, added to in fp32 and
        re-quantized; the packed weight from before is kept (a quantized copy, cheap), since re-quantizing
        ``W + ΔW − ΔW`` would leave the quantization error twice. A missing bias is created.
        """
        base = self.get_base_layer()
        if name == "weight" and self.is_quantized:
            saved = merging.SavedQuantizedWeight(base.weight, copy.copy(base.state) if hasattr(base, "state") else None)
            weight = self.get_base_weight()
            if isinstance(increment, merging.SparseIncrement):
                increment = increment.dense((self.out_features, self.in_features), torch.float32)
            self.set_base_weight((weight.float() + increment.float()).to(weight.dtype))
            return saved
        if name == "bias" and base.bias is None:
            base.bias = nn.Parameter(increment.detach().clone().to(self.adapter_dtype()), requires_grad=False)
            return merging.CreatedBias()
        return merging.add_saving(getattr(base, name).data, self._in_storage_layout(name, increment))

    def _in_storage_layout(self, name: str, increment: merging.Increment) -> merging.Increment:
        """A linear weight's increment in the layout the base stores the weight in (GPT-2's Conv1D: ``(in, out)``)."""
        if name != "weight" or self.is_quantized or not isinstance(self.get_base_layer(), Conv1D):
            return increment
        if isinstance(increment, merging.SparseIncrement):
            return increment.transposed((self.out_features, self.in_features))
        return increment.T

    def _restore_base(self, adapter_name: str) -> None:
        """Give the base parameters back what the merge of ``adapter_name`` overwrote."""
        self._restore_saved(self.merge_saved.pop(adapter_name, {}))

    def _restore_saved(self, saved_entries: dict[str, merging.Saved]) -> None:
        base = self.get_base_layer()
        with torch.no_grad():
            for name, saved in saved_entries.items():
                if isinstance(saved, merging.SavedQuantizedWeight):
                    base.weight = saved.weight
                    if saved.state is not None:
                        base.state = saved.state  # bitsandbytes 8-bit keeps the weight's scales (CB, SCB) here
                elif isinstance(saved, merging.CreatedBias):
                    base.bias = None
                else:
                    saved.restore(getattr(base, name).data)

    # ------------------------------------------------------------------------------------------ checkpoints
    def write_checkpoint(
        self, adapter_name: str, key: str, entries: dict[str, torch.Tensor], config: PeftConfig
    ) -> None:
        """Replace this layer's entries in ``entries`` (keys ``<key>.<attribute>.<adapter>...``, as PEFT collected
        them) by its compact format. The default keeps PEFT's entries."""

    def read_checkpoint(self, adapter_name: str, key: str, state_dict: dict[str, torch.Tensor]) -> None:
        """Decode this layer's compact entries from ``state_dict`` (popping them), resize the adapter to fit, and
        leave in ``state_dict`` what PEFT loads into the parameters. ``ValueError`` when they do not fit."""


# ------------------------------------------------------------------------------------------------ tuner model


def _parameters_created_on_meta() -> bool:
    """Whether new parameters land on the meta device here: ``get_peft_model(..., low_cpu_mem_usage=True)`` builds
    the tuner inside Accelerate's ``init_empty_weights`` instead of passing the flag on."""
    probe = nn.Module()
    probe.register_parameter("probe", nn.Parameter(torch.zeros(1)))
    return probe.probe.is_meta


def _io_features(module: nn.Module) -> tuple[Optional[int], Optional[int]]:
    """``(in_features, out_features)`` of a wrapped module, as PEFT expects every tuner layer to expose them."""
    if is_linear(module):
        out_size, in_size = linear_shape(module)
        return in_size, out_size
    if is_norm(module):
        return module.weight.shape[0], module.weight.shape[0]
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return getattr(module, "in_features", None), getattr(module, "out_features", None)


def _keep_bnb_4bit_weight_readable(layer: nn.Module) -> None:
    """Stop bitsandbytes from repacking a CPU ``Linear4bit`` weight for its bf16 inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit`` weight in place at its first eval-mode,
    no-grad forward. The repacked weight no longer dequantizes to the layer's weight (``dequantize_4bit`` reads it
    as the usual layout; off by 0.1 on a 0.02-scale weight), and converting it back is lossy. Every tuner reads
    the dequantized weight: magnitude supports and masks, Learner selection, ``merge_and_unload``. So a wrapped
    layer keeps the standard layout (its eval forward takes bitsandbytes' generic 4-bit path); a layer that was
    already repacked (an eval forward before ``get_peft_model``) is converted back, as bitsandbytes' own
    ``state_dict`` does.
    """
    if not hasattr(layer, "support_avx512bf16_for_cpu"):
        return
    layer.support_avx512bf16_for_cpu = False
    weight = layer.weight
    if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)


class SparseTunerModel(BaseTuner):
    """Base class of peft_sparse's tuner models (a PEFT ``BaseTuner``)."""

    #: the tuner layer class; it must provide ``update_layer``.
    tuner_layer_cls: type[SparseTunerLayer]
    target_module_mapping: dict[str, list[str]] = {}
    #: Whether ``target_modules="all-linear"`` means something for this tuner (Learners pick FFNs themselves).
    accepts_all_linear: bool = True
    #: Whether transformers' own ``model.load_adapter`` loads this tuner exactly (fixed-shape entries only).
    transformers_loader_exact: bool = False

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        self._calibrating = False
        # Per adapter: every parameter's trainability before it was injected (what a failed load restores), and
        # the adapters found calibrated, so that a training forward does not look them up again.
        self._trainability_before: dict[str, list[tuple[torch.Tensor, bool]]] = {}
        self._known_calibrated: set[str] = set()
        super().__init__(model, *args, **kwargs)

    def tuner_layers(self) -> list[tuple[str, SparseTunerLayer]]:
        """``(name, layer)`` of every layer of this tuner in the model."""
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, self.tuner_layer_cls)]

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # PEFT calls this once an adapter is built (``get_peft_model(..., autocast_adapter_dtype=True)``, the
        # default, upcasts bf16/fp16 adapter values to fp32). The choice is kept so that values created later, by
        # calibration (LayerSelect's blocks), follow it too.
        if not hasattr(self, "_autocast_adapter_dtype"):
            self._autocast_adapter_dtype: dict[str, bool] = {}
        self._autocast_adapter_dtype[adapter_name] = autocast_adapter_dtype
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

    def _recast_adapter_dtype(self, adapter_name: str) -> None:
        """Apply the adapter's dtype choice (see ``_cast_adapter_dtype``) to values created after injection."""
        choice = getattr(self, "_autocast_adapter_dtype", {}).get(adapter_name, True)
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=choice)

    # ------------------------------------------------------------------------------------------- injection
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        loading.refuse_transformers_loader(type(self), self.peft_config[adapter_name])
        if kwargs.get("low_cpu_mem_usage") or _parameters_created_on_meta():
            self.peft_config.pop(adapter_name, None)
            raise ValueError(
                f"{type(self).__name__} does not support low_cpu_mem_usage=True: its adapters are built from the base "
                "weights (supports, masks, Learner nodes) and resized by the checkpoint they load, which PEFT's empty "
                "(meta-device) adapter weights cannot serve. Leave low_cpu_mem_usage=False (the default); the model "
                "was left as it was."
            )
        self._known_calibrated.discard(adapter_name)
        # The tuner keeps its own copy of the config and resolves model-dependent defaults into it, so the user's
        # config object is never changed: the same config can build adapters on several models.
        source = getattr(self.peft_config[adapter_name], "_loaded_from", None)
        self.peft_config[adapter_name] = copy.deepcopy(self.peft_config[adapter_name])
        if source is not None:
            loading.check_readable_checkpoint(source)  # before any module is touched
        # Tensors that the checkpoint being loaded replaces need no initial values (SparseMask's delta support).
        self.peft_config[adapter_name]._from_checkpoint = loading.inside_peft_load_adapter()
        # What a failed load restores: every parameter's trainability before this adapter existed.
        trainability = [(p, p.requires_grad) for p in model.parameters()]
        self._trainability_before[adapter_name] = trainability
        existing = any(isinstance(m, BaseTunerLayer) for m in model.modules())
        with _skip_init_on_device():
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        if existing:
            # Adding an adapter keeps the trainability of everything already there. PEFT restores it too, but
            # matches names with ".<adapter>.", so an adapter named "0" skips every parameter of block 0.
            for param, requires_grad in trainability:
                param.requires_grad_(requires_grad)

    def _resolve_config(self, model: nn.Module, config: PeftConfig) -> PeftConfig:
        """Fill in model-dependent defaults; return the config to inject with. The default target is every
        linear layer inside the transformer blocks (SparseMask, DPS); other tuners override this."""
        if config.target_modules is None:
            config.target_modules = self._block_linear_names(model, config)
        return config

    def _block_linear_names(self, model: nn.Module, config: PeftConfig) -> list[str]:
        """Every linear layer inside the stack of transformer blocks, outside the task head: the default
        target of the tuners that train weight matrices."""
        try:
            stack_name, _ = find_layer_stack(model, _pattern(config))
        except ValueError as error:
            raise ValueError(f"{error}; give {type(config).__name__}(target_modules=[...]) for this model") from None
        head = head_module_names(model, config.modules_to_save)
        return sorted(
            name
            for name, module in self._base_modules(model)
            if is_under(name, [stack_name]) and is_linear(module) and not is_under(name, head)
        )

    def _supports(self, module: nn.Module) -> bool:
        """Whether this tuner can wrap ``module`` (default: linear layers, quantized ones included)."""
        return is_linear(module)

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        # Called by PEFT's inject_adapter before any module is touched, for the first adapter and for every
        # adapter added later, so all validation lives here. ``peft_config`` is the tuner's own copy.
        targets = peft_config.target_modules
        if isinstance(targets, str) and targets.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND:
            if not self.accepts_all_linear:
                raise ValueError(
                    f"target_modules='all-linear' does not apply to {type(peft_config).__name__}: it chooses its "
                    "modules itself (see its docstring); leave target_modules unset"
                )
            self._expand_all_linear(peft_config, self.model)
        self._check_layers_to_transform(self.model, peft_config)
        config = self._resolve_config(self.model, peft_config)
        if config.target_modules != DUMMY_TARGET_MODULES:
            config = self._apply_layers_to_transform(self.model, config)
            self._validate_targets(self.model, config)
        return config

    def _expand_all_linear(self, config: PeftConfig, model: nn.Module) -> None:
        """``target_modules="all-linear"`` by PEFT's own expansion, exactly as for LoRA (every linear layer but the
        output embeddings / the classification head), recorded as explicit names so that a saved adapter reloads onto
        the same ones. On a model that already holds adapters, a tuner layer counts as the linear layer it wraps
        (PEFT recognises only tuner layers named ``*Linear*``), and what lies inside PEFT's wrappers (a
        ``modules_to_save`` copy, a ``base_layer``) is left out."""
        config.target_modules = INCLUDE_LINEAR_LAYERS_SHORTHAND
        _maybe_include_all_linear_layers(config, model)
        visible = dict(self._base_modules(model))
        head = head_module_names(model, config.modules_to_save)
        wrapped = {
            name for name, module in model.named_modules()
            if isinstance(module, BaseTunerLayer) and name in visible and is_linear(visible[name])
            and not is_under(name, head)
        }
        config.target_modules = sorted({name for name in config.target_modules if name in visible} | wrapped)

    def _check_layers_to_transform(self, model: nn.Module, config: PeftConfig) -> None:
        """Every block index in ``layers_to_transform`` must exist (PEFT silently drops unknown ones)."""
        layers = getattr(config, "layers_to_transform", None)
        if layers is None:
            return
        stack_name, stack = find_layer_stack(model, _pattern(config))
        wanted = [layers] if isinstance(layers, int) else list(layers)
        missing = sorted(i for i in wanted if not 0 <= i < len(stack))
        if missing:
            raise ValueError(
                f"layers_to_transform {missing} out of range: {stack_name} has {len(stack)} blocks (0..{len(stack) - 1})"
            )

    def _apply_layers_to_transform(self, model: nn.Module, config: PeftConfig) -> PeftConfig:
        """Keep only the targets inside the listed blocks. PEFT applies ``layers_to_transform`` to suffixes and
        regexes but not to full module names (it matches those directly), which is what defaults resolve to."""
        layers = getattr(config, "layers_to_transform", None)
        if layers is None or not isinstance(config.target_modules, (list, set, tuple)):
            return config
        stack_name, _ = find_layer_stack(model, _pattern(config))
        wanted = {layers} if isinstance(layers, int) else set(layers)
        names = dict(self._base_modules(model))
        kept = []
        for target in config.target_modules:
            if target in names:  # a full name: PEFT would not filter it
                if block_index(target, stack_name) in wanted:
                    kept.append(target)
            else:
                kept.append(target)  # a suffix: PEFT filters it by block
        if not kept:
            raise ValueError(f"no target module lies in blocks {sorted(wanted)} of {stack_name}")
        config.target_modules = kept
        return config

    @staticmethod
    def _base_modules(model: nn.Module):
        """``(name, module)`` for every module a tuner may target: a tuner layer counts as its base layer, a PEFT
        wrapper of a module trained whole (``modules_to_save``) as its original module, and what lives inside either
        (``base_layer``, adapter weights, the wrapper's copies) is skipped."""
        inside: list[str] = []
        for key, module in model.named_modules():
            if not key or is_under(key, inside):
                continue
            if isinstance(module, BaseTunerLayer):
                inside.append(key)
                module = module.get_base_layer()
            elif isinstance(module, AuxiliaryTrainingWrapper):
                inside.append(key)
                module = getattr(module, "original_module", module)
            yield key, module

    def _targeted_modules(self, model: nn.Module, config: PeftConfig) -> dict[str, nn.Module]:
        """The modules that ``config`` selects, matched exactly as PEFT's inject_adapter will match them."""
        found: dict[str, nn.Module] = {}
        for key, module in self._base_modules(model):
            result = self._check_target_module_exists(config, key)
            if result and not isinstance(result, _ExcludedModule):
                found[key] = module
        return found

    def _validate_targets(self, model: nn.Module, config: PeftConfig) -> None:
        found = self._targeted_modules(model, config)
        head = head_module_names(model, config.modules_to_save)
        targets = config.target_modules
        if isinstance(targets, (list, set, tuple)):
            keys = [k for k, _ in model.named_modules()]
            hits = {t: [k for k in keys if k == t or k.endswith("." + t)] for t in targets}
            missing = sorted(t for t, ks in hits.items() if not ks)
            if missing:
                raise ValueError(
                    f"target_modules {missing} match no module of {type(model).__name__}. "
                    "Check the names with `[name for name, _ in model.named_modules()]`."
                )
            head_only = sorted(t for t, ks in hits.items() if all(is_under(k, head) for k in ks))
            if head_only:
                raise ValueError(
                    f"target_modules {head_only} are part of the task head (modules_to_save or output embeddings), "
                    "which is trained whole; remove them from target_modules"
                )
        if not found:
            raise ValueError(f"target_modules={targets!r} selects no module of {type(model).__name__}")
        unsupported = {k: type(m).__name__ for k, m in found.items() if not self._supports(m)}
        if unsupported:
            listed = first_of([f"{name}: {kind}" for name, kind in unsupported.items()], 5)
            raise ValueError(
                f"{type(self).__name__} cannot wrap these target modules (name: type): {listed}"
                + self._unsupported_hint(unsupported)
            )

    def _unsupported_hint(self, unsupported: dict[str, str]) -> str:
        return ""

    def _create_and_replace(
        self,
        peft_config: PeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: Optional[str] = None,
    ) -> None:
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, peft_config, current_key=current_key)
            return
        kwargs = self._layer_kwargs(peft_config, current_key)
        new_module = self.tuner_layer_cls(target, adapter_name, peft_config, current_key=current_key, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _layer_kwargs(self, config: PeftConfig, key: str) -> dict[str, Any]:
        """Extra constructor arguments of the tuner layer wrapping module ``key`` (e.g. its role)."""
        return {}

    # ------------------------------------------------------------------------------------------ checkpoints
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """PEFT's entries of this adapter, with each tuner layer's own entries in its own (compact) format."""
        result = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for name, layer in model.named_modules():
            if isinstance(layer, cls.tuner_layer_cls) and layer.has_adapter(adapter_name):
                layer.write_checkpoint(adapter_name, name, result, config)
        return result

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        try:
            remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
            remapped = loading.read_layer_checkpoints(cls, model, adapter_name, remapped)
            problems = loading.checkpoint_problems(cls.prefix, model, adapter_name, remapped)
            if problems:
                raise ValueError(
                    f"The {cls.prefix.rstrip('_')} adapter checkpoint does not fit this model ({first_of(problems, 6)}). "
                    "It was saved from another architecture, head, layer selection or tuner configuration; the model "
                    "was left as it was."
                )
        except ValueError:
            loading.remove_adapter(model, adapter_name)
            raise
        return remapped

    # ------------------------------------------------------------------------------------------ calibration
    def needs_calibration(self, adapter_name: str) -> bool:
        """Whether ``adapter_name`` still waits for ``peft_sparse.calibrate`` to measure its selection."""
        return False

    def _begin_calibration(self, adapter_names: list[str]) -> CalibrationSession:
        raise TypeError(f"{type(self).__name__} has nothing to calibrate")

    def forward(self, *args: Any, **kwargs: Any):
        if distributed.world_size() > 1:
            distributed.check_sharding(self)
        if self.model.training and not self._calibrating:
            unknown = [a for a in self.active_adapters if a not in self._known_calibrated]
            pending = [a for a in unknown if self.needs_calibration(a)]
            if pending:
                raise CalibrationRequiredError(
                    f"Adapter(s) {pending} choose what to train from data: run "
                    "`peft_sparse.calibrate(model, batches)` before training (eval-mode forwards are fine)."
                )
            self._known_calibrated.update(unknown)  # calibrated adapters stay so until deleted or re-injected
        return super().forward(*args, **kwargs)

    # ----------------------------------------------------------------------------------- several adapters at once
    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "linear",
        density: Optional[float] = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Add ``adapter_name``, a weighted combination of ``adapters``, with PEFT LoRA's combination types
        (``tuners/combine.py``): ``"linear"`` and ``"cat"`` (both the exact sum ``Σ wᵢ Δᵢ`` of the increments),
        ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"`` (PEFT's ``merge_utils`` on the
        increments; ``density`` in (0, 1], ``majority_sign_method`` for the ties types). The new adapter holds the
        union of the sources' supports, nodes, modules and heads; it is not active (``set_adapter`` it). A
        ``ValueError`` where a combination has no meaning (SparseMask masks, configs that disagree, SVD types);
        nothing is added then."""
        combine.add_weighted_adapter(
            self, adapters, weights, adapter_name, combination_type, density, majority_sign_method
        )

    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """PeftModel's seam for ``adapter_names`` in ``forward`` and ``generate``: a mixed-adapter batch, with PEFT
        LoRA's semantics (``tuners/mixed_batch.py``)."""
        return mixed_batch.adapter_names_hooks(self, *args, **kwargs)

    # --------------------------------------------------------------------------------------- merging, deleting
    def _refuse_non_finite(self, adapter_names: Optional[list[str]]) -> None:
        """``safe_merge``: every layer is checked before any is merged, so a NaN anywhere merges nothing."""
        bad = sorted({a for _, layer in self.tuner_layers() for a in layer.non_finite_adapters(adapter_names)})
        if bad:
            raise ValueError(f"NaNs or infinities in adapter(s) {bad}; nothing was merged (safe_merge=True)")

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        if safe_merge:
            self._refuse_non_finite(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None):
        if merge and safe_merge:
            self._refuse_non_finite(adapter_names)
        return super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar, safe_merge=safe_merge,
                                                    adapter_names=adapter_names)

    def delete_adapter(self, adapter_name: str) -> None:
        """PEFT's ``delete_adapter``; the layers free every per-adapter entry they registered with PEFT
        (``adapter_layer_names`` / ``other_param_names``) and the tuner its own."""
        super().delete_adapter(adapter_name)
        self._trainability_before.pop(adapter_name, None)
        self._known_calibrated.discard(adapter_name)
        getattr(self, "_autocast_adapter_dtype", {}).pop(adapter_name, None)

    # ------------------------------------------------------------------------------------------- schedules
    def set_total_steps(self, total_steps: int) -> None:
        """The run's length in optimizer steps (``SparseTrainerCallback`` passes ``max_steps``); tuners with a
        schedule (DPS) use it, the others ignore it."""

    def update_and_allocate(self, global_step: int) -> None:
        """Call after each ``optimizer.step()`` and before ``zero_grad`` (PEFT's AdaLoRA convention). A no-op for
        tuners without a schedule, so one training loop serves every peft_sparse method."""


def _pattern(config: PeftConfig) -> Optional[str]:
    pattern = getattr(config, "layers_pattern", None)
    if isinstance(pattern, (list, tuple)):
        return pattern[0] if len(pattern) == 1 else None
    return pattern or None


def shallow_with(config: PeftConfig, **changes: Any) -> PeftConfig:
    """A shallow copy of ``config`` with some fields replaced (used to inject with resolved values)."""
    new = copy.copy(config)
    for name, value in changes.items():
        setattr(new, name, value)
    return new
