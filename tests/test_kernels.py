"""The Triton kernels (``peft_sparse.kernels``) against their torch references, and the backend dispatch.

The kernels run here on CPU tensors in Triton's interpreter. ``TRITON_INTERPRET=1`` must be in the environment
before triton is first imported (``triton.language`` builds its own jit functions for one mode at import), and
torch imports triton early (conftest's imports already have), so when this module is collected without it the
kernel tests (``TestKernels``) run in one subprocess started with it: ``test_kernels_in_the_interpreter``.
To run them directly: ``TRITON_INTERPRET=1 pytest tests/test_kernels.py``.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peft_sparse import SparseMaskConfig, kernels, sparse
from peft_sparse.tuners.sparsemask import selection
from peft_sparse.kernels import function, reference
from peft_sparse.kernels.layout import block_value_index

from fresh_python import run_python
from tiny_models import VOCAB, make_batch


def _in_interpreter() -> bool:
    """Whether the kernels can run here: triton present, imported with ``TRITON_INTERPRET=1``."""
    if os.environ.get("TRITON_INTERPRET") != "1" or not kernels.is_triton_available():
        return False
    from peft_sparse.kernels._triton import language_mode_mismatch

    return language_mode_mismatch() is None


IN_INTERPRETER = _in_interpreter()
# Older interpreters cannot take a tensor as a loop bound under numpy 2 (int() of a 1-element array).
INTERPRETER_MIN_TRITON = "3.7"
INTERPRETER_SKIP_REASON = "the kernel tests need triton >= 3.7 (the optional `triton` extra) for its interpreter"

# ------------------------------------------------------------------------------------------- supports

SHAPES = {  # name: (shape, block_size, how the support is drawn)
    "unstructured-odd": ((37, 23), 1, "entries"),
    "block16-edges": ((40, 56), 16, "blocks"),  # clipped blocks at the right and bottom edges, and the corner
    "block32-aligned": ((64, 96), 32, "blocks"),
    "block5-no-kernel": ((30, 21), 5, "blocks"),  # a block size the block kernels do not take: entry kernels
    "block16-not-blocks": ((40, 56), 16, "entries"),  # a block_size whose support is not whole blocks
}


def make_delta(name: str, dtype=torch.float32, seed: int = 0) -> sparse.SparseDelta:
    shape, block_size, kind = SHAPES[name]
    g = torch.Generator().manual_seed(seed)
    if kind == "entries":
        support = selection.random_support(shape, shape[0] * shape[1] // 6, g)
    else:
        grid = (-(-shape[0] // block_size), -(-shape[1] // block_size))
        total = grid[0] * grid[1]
        ids = torch.randperm(total, generator=g)[: max(2, total // 3)]
        ids = torch.unique(torch.cat([ids, torch.tensor([grid[1] - 1, total - 1])]))  # an edge block and the corner
        support = selection.block_support(ids, shape, block_size)
    delta = sparse.SparseDelta(shape, support, dtype, block_size=block_size)
    with torch.no_grad():
        delta.values.normal_(generator=g)
    return delta


def uses_block_kernels(delta: sparse.SparseDelta) -> bool:
    pattern = delta.block_pattern()
    return pattern is not None and pattern.block_size in kernels.BLOCK_KERNEL_SIZES


# --------------------------------------------------------------------------- layout and dispatch (no triton)


def test_block_pattern_describes_whole_block_supports():
    delta = make_delta("block16-edges")
    pattern = delta.block_pattern()
    assert pattern is not None and pattern.block_size == 16
    assert torch.equal(selection.block_support(pattern.rows * 4 + pattern.cols, delta.shape, 16), delta.indices)
    # Block-major positions of the row-major values: the blocks of the dense ΔW, -1 outside the weight.
    index = block_value_index(delta.layout())
    assert index.shape == (pattern.rows.numel(), 16, 16)
    dense = torch.nn.functional.pad(delta.dense(), (0, 64 - 56, 0, 48 - 40))
    for k, (br, bc) in enumerate(zip(pattern.rows.tolist(), pattern.cols.tolist())):
        block = dense[br * 16:(br + 1) * 16, bc * 16:(bc + 1) * 16]
        inside = index[k] >= 0
        assert torch.equal(delta.values.detach()[index[k][inside]], block[inside])
        assert inside.sum() == (min(40, br * 16 + 16) - br * 16) * (min(56, bc * 16 + 16) - bc * 16)
    assert sorted(index[index >= 0].tolist()) == list(range(delta.numel_support))
    # CSC order, for grad_x = grad @ ΔW.
    layout = delta.layout()
    ccol, row, order = layout.ccol, layout.csc_row, layout.csc_order
    cols = delta.indices[order] % delta.shape[1]
    assert torch.equal(cols, cols.sort().values) and torch.equal(row, delta.indices[order] // delta.shape[1])
    assert torch.equal(ccol[1:] - ccol[:-1], torch.bincount(cols, minlength=delta.shape[1]))


def test_block_pattern_is_none_without_whole_blocks_and_follows_the_support():
    assert make_delta("block16-not-blocks").block_pattern() is None
    assert make_delta("unstructured-odd").block_pattern() is None
    delta = make_delta("block16-edges")
    first = delta.block_pattern()
    assert delta.block_pattern() is first  # derived once per support
    delta.set_support(delta.indices[1:])  # no longer whole blocks
    assert delta.block_pattern() is None
    delta.set_support(selection.block_support(torch.tensor([5]), delta.shape, 16))
    assert delta.block_pattern().rows.tolist() == [1] and delta.block_pattern().cols.tolist() == [1]
    delta.block_size = 8  # a 16-block is four whole 8-blocks
    assert delta.block_pattern().block_size == 8 and delta.block_pattern().rows.numel() == 4
    with pytest.raises(ValueError, match="block_size"):
        sparse.SparseDelta((4, 4), torch.tensor([0]), torch.float32, block_size=0)


def test_backend_selection_and_repr():
    x = torch.zeros(2, 3)
    assert kernels.get_backend() == "auto" and kernels.backend_for(x) == "torch"  # auto: torch on CPU tensors
    delta = make_delta("block16-edges")
    assert "block_size=16" in repr(delta) and "backend=auto->torch" in repr(delta)
    with kernels.use_backend("Torch"):
        assert kernels.get_backend() == "torch" and kernels.backend_for(x) == "torch"
        assert "backend=torch->torch" in repr(delta)
        with pytest.raises(ValueError, match="backend='cuda' is not one of auto, torch, triton"):
            kernels.set_backend("cuda")
    assert kernels.get_backend() == "auto"  # the context manager restores the previous backend


def test_the_backend_is_read_from_the_environment_once_at_import():
    code = "import peft_sparse.kernels as k; print(k.get_backend())"
    env = {**os.environ, "PEFT_SPARSE_BACKEND": " Torch "}
    done = run_python(["-c", code], env)
    assert done.returncode == 0 and done.stdout.strip() == "torch", done.stderr[-2000:]
    env["PEFT_SPARSE_BACKEND"] = "cuda"
    done = run_python(["-c", code], env)
    assert done.returncode != 0 and "PEFT_SPARSE_BACKEND='cuda' is not one of auto, torch, triton" in done.stderr


FORCED = r"the peft_sparse backend is 'triton' \(PEFT_SPARSE_BACKEND or set_backend\), but "


def test_forcing_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    message = FORCED
    if kernels.is_triton_available():
        message += "the tensors are on the CPU and TRITON_INTERPRET=1 is not set"
    delta = make_delta("unstructured-odd")
    x = torch.randn(4, 23, requires_grad=True)
    with kernels.use_backend("triton"):
        with pytest.raises(RuntimeError, match=message):
            kernels.backend_for(torch.zeros(2, 3))
        assert "backend=triton->unavailable" in repr(delta)
        with pytest.raises(RuntimeError, match=FORCED):
            sparse.sparse_delta_linear(x, delta.values, delta)


def test_forcing_triton_without_triton_installed_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # what `import triton` sees when it is not installed
    kernels.is_triton_available.cache_clear()  # the answer is cached per process; this test fakes another one
    assert not kernels.is_triton_available()
    with kernels.use_backend("triton"):
        with pytest.raises(RuntimeError, match=r"triton is not installed \(pip install triton\)"):
            kernels.backend_for(torch.zeros(2, 3))
    assert kernels.backend_for(torch.zeros(2, 3)) == "torch"
    kernels.is_triton_available.cache_clear()


@pytest.mark.skipif(IN_INTERPRETER or not kernels.is_triton_available(), reason="needs triton, imported without TRITON_INTERPRET")
def test_setting_the_interpreter_after_triton_was_imported_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with kernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 was set after triton"):
        kernels.backend_for(torch.zeros(2, 3))


def test_the_package_imports_and_trains_without_triton():
    """A fresh interpreter where ``import triton`` fails: the kernels package, its modules and the torch path."""
    code = """
import sys
sys.modules["triton"] = None
import torch
from peft_sparse import kernels, sparse
from peft_sparse.tuners.sparsemask import selection
from peft_sparse.kernels import reference, sddmm, spmm
assert not kernels.is_triton_available() and kernels.backend_for(torch.zeros(1)) == "torch"
delta = sparse.SparseDelta((6, 5), torch.tensor([1, 7, 12, 29]), torch.float32)
x = torch.randn(2, 3, 5, requires_grad=True)
sparse.sparse_delta_linear(x, delta.values, delta).sum().backward()
ref = reference.sddmm_reference(torch.ones(6, 6), x.detach().reshape(6, 5), delta.indices)
torch.testing.assert_close(delta.values.grad, ref)
print("ok")
"""
    env = {**os.environ, "PEFT_SPARSE_BACKEND": "auto"}
    done = run_python(["-c", code], env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


# ------------------------------------------------------------------------------- kernels (interpreter)

DTYPES = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # outputs in the activations' dtype


def assert_close_scaled(got: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """``|got - expected| <= tol · (1 + max |expected|)`` elementwise (the kernels and references sum in
    different orders; outputs in bf16/fp16 round at their own precision)."""
    assert got.shape == expected.shape
    scale = 1.0 + (expected.abs().max().item() if expected.numel() else 0.0)
    err = (got.float() - expected.float()).abs().max().item() if got.numel() else 0.0
    assert err <= tol * scale, f"max error {err:.3g} > {tol * scale:.3g}"


class TestKernels:
    """Every kernel against the torch reference (run under ``TRITON_INTERPRET=1``; see the module docstring)."""

    @pytest.fixture(autouse=True)
    def triton_backend(self):
        pytest.importorskip("triton", minversion=INTERPRETER_MIN_TRITON, reason=INTERPRETER_SKIP_REASON)
        with kernels.use_backend("triton"):
            yield

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("name", SHAPES)
    def test_sddmm(self, name, dtype):
        from peft_sparse.kernels import sddmm

        delta = make_delta(name)
        layout = delta.layout()
        g = torch.Generator().manual_seed(1)
        grad = torch.randn(29, delta.shape[0], generator=g).to(dtype)
        x = torch.randn(29, delta.shape[1], generator=g).to(dtype)
        expected = reference.sddmm_reference(grad, x, delta.indices)
        got = function.sddmm(grad, x, layout)  # dispatches: the block kernel where the support allows
        assert got.dtype == torch.float32
        # Products of the inputs are exact in fp32, in every dtype: only the order of the sums differs.
        assert_close_scaled(got, expected, 1e-5)
        if uses_block_kernels(delta):  # the entry kernel serves block supports too
            assert_close_scaled(sddmm.sddmm_csr(grad, x, delta.indices, delta.shape[1]), expected, 1e-5)
        with kernels.use_backend("torch"):  # the torch implementation (CSR, or the batched block product)
            assert_close_scaled(function.sddmm(grad, x, layout), expected, 1e-5)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("name", SHAPES)
    def test_spmm_both_directions(self, name, dtype):
        from peft_sparse.kernels import spmm

        delta = make_delta(name)
        layout = delta.layout()
        g = torch.Generator().manual_seed(2)
        x = torch.randn(21, delta.shape[1], generator=g).to(dtype)
        grad = torch.randn(21, delta.shape[0], generator=g).to(dtype)
        values = delta.values.detach()
        y = spmm.spmm(x, values, layout)
        grad_x = spmm.spmm_t(grad, values, layout)
        assert y.dtype == dtype and grad_x.dtype == dtype
        assert_close_scaled(y, reference.spmm_reference(x, delta.indices, values, delta.shape), DTYPES[dtype])
        assert_close_scaled(grad_x, reference.spmm_t_reference(grad, delta.indices, values, delta.shape),
                            DTYPES[dtype])
        if uses_block_kernels(delta):  # the entry kernels serve block supports too
            assert_close_scaled(spmm.spmm_csr(x, values, layout), y, DTYPES[dtype])
            assert_close_scaled(spmm.spmm_t_csr(grad, values, layout), grad_x, DTYPES[dtype])
        with kernels.use_backend("torch"):
            assert_close_scaled(function.spmm(x, values, layout), y, DTYPES[dtype])
            assert_close_scaled(function.spmm_t(grad, values, layout), grad_x, DTYPES[dtype])

    def test_tokens_split_over_programs(self):
        """The token split (fp32 atomics), which a GPU uses when there are few entries or blocks."""
        from peft_sparse.kernels import sddmm

        for name in ("unstructured-odd", "block16-edges"):
            delta = make_delta(name)
            grad, x = torch.randn(70, delta.shape[0]), torch.randn(70, delta.shape[1])
            expected = reference.sddmm_reference(grad, x, delta.indices)
            got = sddmm.sddmm_csr(grad, x, delta.indices, delta.shape[1], split=3, block_t=16)
            assert_close_scaled(got, expected, 1e-5)
            if name != "unstructured-odd":
                got = sddmm.sddmm_bsr(grad, x, delta.block_pattern(), delta.shape, split=3, block_t=16)
                assert_close_scaled(got, expected, 1e-5)

    @pytest.mark.parametrize("tokens", [0, 5])
    def test_empty_supports_and_no_tokens(self, tokens):
        for name in ("unstructured-odd", "block16-edges"):
            delta = make_delta(name)
            if tokens:
                delta.set_support(torch.zeros(0, dtype=torch.int64))
            layout = delta.layout()
            x, grad = torch.randn(tokens, delta.shape[1]), torch.randn(tokens, delta.shape[0])
            k = delta.numel_support
            torch.testing.assert_close(function.sddmm(grad, x, layout), torch.zeros(k))
            torch.testing.assert_close(function.spmm(x, delta.values, layout), torch.zeros(tokens, delta.shape[0]))
            torch.testing.assert_close(function.spmm_t(grad, delta.values, layout), torch.zeros(tokens, delta.shape[1]))
            y = sparse.sparse_delta_linear(x.view(1, tokens, delta.shape[1]).requires_grad_(), delta.values, delta)
            y.sum().backward()
            assert y.shape == (1, tokens, delta.shape[0]) and delta.values.grad.shape == (k,)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("with_weight", [False, True], ids=["no-weight", "weight"])
    @pytest.mark.parametrize("name", ["unstructured-odd", "block16-edges"])
    def test_linear_on_3d_inputs_matches_the_reference(self, name, with_weight, dtype):
        """``sparse_delta_linear`` forward and backward (SpMM both ways and SDDMM) on both backends, against
        the dense reference."""
        delta = make_delta(name, dtype=dtype)
        g = torch.Generator().manual_seed(3)
        x0 = torch.randn(2, 5, delta.shape[1], generator=g).to(dtype)
        weight = torch.randn(delta.shape, generator=g).to(dtype) if with_weight else None
        bias = torch.randn(delta.shape[0], generator=g).to(dtype)
        upstream = torch.randn(2, 5, delta.shape[0], generator=g).to(dtype)
        results = {}
        for backend in ("reference", "torch", "triton"):
            delta.values.grad = None
            x = x0.clone().requires_grad_()
            if backend == "reference":
                y = reference.sparse_delta_linear_reference(x, delta.indices, delta.values, delta.shape, weight, bias)
            else:
                with kernels.use_backend(backend):
                    y = sparse.sparse_delta_linear(x, delta.values, delta, weight, bias)
                    (y * upstream).sum().backward()
            if backend == "reference":
                (y * upstream).sum().backward()
            results[backend] = (y.detach(), x.grad, delta.values.grad)
        tol = DTYPES[dtype] * 4
        for backend in ("torch", "triton"):
            for expected, got in zip(results["reference"], results[backend]):
                assert got.dtype == expected.dtype
                assert_close_scaled(got, expected, tol)

    @pytest.mark.parametrize("hidden", [32, 40], ids=["hidden32", "hidden40"])
    @pytest.mark.parametrize("block_size", [1, 16], ids=["entries", "blocks16"])
    def test_tiny_llama_gradients_match_the_torch_backend(self, block_size, hidden):
        """A whole SparseMask LLaMA, two adapters active (the second runs without the weight: SpMM both ways)."""
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden + 16, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
        density = 0.05 if block_size == 1 else 0.3
        model = get_peft_model(LlamaForCausalLM(config), SparseMaskConfig(
            task_type="CAUSAL_LM", density=density, block_size=block_size))
        model.add_adapter("second", SparseMaskConfig(
            task_type="CAUSAL_LM", density=density, block_size=block_size, selection="random"))
        model.base_model.set_adapter(["default", "second"])
        deltas = {n: m for n, m in model.named_modules() if isinstance(m, sparse.SparseDelta)}
        assert len(deltas) == 14
        for delta in deltas.values():
            assert delta.block_size == block_size
            assert (delta.block_pattern() is not None) == (block_size > 1)
            with torch.no_grad():
                delta.values.normal_(0, 0.02)
        batch = make_batch("llama", batch=2, seq=5)
        model.train()
        results = {}
        for backend in ("torch", "triton"):
            with kernels.use_backend(backend):
                model.zero_grad(set_to_none=True)
                loss = model(**batch).loss
                loss.backward()
            results[backend] = (loss.detach(), {n: d.values.grad.clone() for n, d in deltas.items()})
        torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
        for name, expected in results["torch"][1].items():
            scale = expected.abs().max()
            assert_close_scaled(results["triton"][1][name] / scale, expected / scale, 1e-4)


CUDA_ONLY = pytest.mark.skipif(
    IN_INTERPRETER or not torch.cuda.is_available() or not kernels.is_triton_available(),
    reason="needs a CUDA GPU and triton (the compiled kernels)",
)


@pytest.fixture
def few_autotune_configs(monkeypatch):
    """Two configs per autotuned block kernel instead of all 20 and 6: the CUDA tests check what the compiled
    kernels compute, not which tile is fastest, and every new autotune key (block size, token bucket, block count,
    dtype) compiles and times every config. The whole file did not finish within a 9-minute GPU call on
    2026-11-23. Kept: the SDDMM with one program per block and with the tokens split over programs (atomics)."""
    from peft_sparse.kernels import sddmm, spmm

    sddmm_tuner, spmm_tuner = sddmm._sddmm_bsr_tuned, spmm._spmm_bsr_tuned
    monkeypatch.setattr(sddmm_tuner, "configs",
                        [next(c for c in sddmm_tuner.configs if c.kwargs["SPLIT"] == split) for split in (1, 4)])
    monkeypatch.setattr(spmm_tuner, "configs", spmm_tuner.configs[:2])


@CUDA_ONLY
@pytest.mark.usefixtures("few_autotune_configs")
def test_compiled_kernels_on_cuda():
    """The same checks as ``TestKernels`` on a GPU with the compiled (and autotuned) kernels, plus LLaMA-sized
    weights and token counts against a float64 reference (skipped on CPU-only CI)."""
    from peft_sparse.kernels import sddmm, spmm

    cases = [(name, 300) for name in SHAPES]
    for shape, block in [((2048, 2048), 32), ((5632, 2048), 64), ((2000, 3000), 32), ((256, 2048), 128)]:
        g = torch.Generator().manual_seed(0)
        count = max(1, round(0.02 * -(-shape[0] // block) * -(-shape[1] // block)))
        support = selection.random_support(shape, count, g, block_size=block)
        cases.append((sparse.SparseDelta(shape, support, torch.float32, block_size=block), 4096))
        support = selection.random_support(shape, round(0.01 * shape[0] * shape[1]), g)
        cases.append((sparse.SparseDelta(shape, support, torch.float32), 1000))
    for case, tokens in cases:
        delta = (make_delta(case) if isinstance(case, str) else case).cuda()
        with torch.no_grad():
            delta.values.normal_()
        layout, values = delta.layout(), delta.values.detach()
        for dtype, tol in DTYPES.items():
            x = torch.randn(tokens, delta.shape[1], device="cuda").to(dtype)
            grad = torch.randn(tokens, delta.shape[0], device="cuda").to(dtype)
            expected = reference.sddmm_reference(grad.double(), x.double(), delta.indices)
            assert_close_scaled(sddmm.sddmm(grad, x, layout), expected, 1e-5)
            assert_close_scaled(function.sddmm(grad, x, layout), expected, tol)  # auto: dense + gather on entries
            assert_close_scaled(sddmm.sddmm_csr(grad, x, delta.indices, delta.shape[1], split=3), expected, 1e-5)
            if uses_block_kernels(delta):
                assert_close_scaled(sddmm.sddmm_bsr(grad, x, layout.blocks, delta.shape, split=3), expected, 1e-5)
            y_ref = reference.spmm_reference(x.double(), delta.indices, values.double(), delta.shape)
            gx_ref = reference.spmm_t_reference(grad.double(), delta.indices, values.double(), delta.shape)
            assert_close_scaled(spmm.spmm(x, values, layout), y_ref, tol)
            assert_close_scaled(spmm.spmm_t(grad, values, layout), gx_ref, tol)
            assert_close_scaled(function.spmm(x, values, layout), y_ref, tol)
            assert_close_scaled(function.spmm_t(grad, values, layout), gx_ref, tol)


@CUDA_ONLY
@pytest.mark.usefixtures("few_autotune_configs")
@pytest.mark.parametrize("block_size", [1, 32], ids=["entries", "blocks32"])
def test_training_on_cuda_matches_the_cpu(block_size):
    """One SparseMask LLaMA step on the GPU (merged weight, kernels) equals the same step on the CPU."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    base = LlamaForCausalLM(config)
    grads = {}
    for device in ("cpu", "cuda"):
        model = get_peft_model(copy.deepcopy(base), SparseMaskConfig(
            task_type="CAUSAL_LM", density=0.1, block_size=block_size, selection="random")).to(device)
        for module in model.modules():
            if isinstance(module, sparse.SparseDelta):
                with torch.no_grad():
                    module.values.copy_(torch.linspace(-0.05, 0.05, module.numel_support))
        batch = {k: v.to(device) for k, v in make_batch("llama", batch=2, seq=7).items()}
        model.train()
        loss = model(**batch).loss
        loss.backward()
        grads[device] = (loss.detach().cpu(), [p.grad.cpu() for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(grads["cuda"][0], grads["cpu"][0], rtol=1e-4, atol=1e-5)
    for got, expected in zip(grads["cuda"][1], grads["cpu"][1]):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5)


if not IN_INTERPRETER:
    # Collected without the interpreter: the kernel tests run in a subprocess that has it (module docstring).
    del TestKernels

    def test_kernels_in_the_interpreter():
        pytest.importorskip("triton", minversion=INTERPRETER_MIN_TRITON, reason=INTERPRETER_SKIP_REASON)
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        env.pop("PEFT_SPARSE_BACKEND", None)
        done = run_python(["-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "TestKernels"], env, timeout=900)
        summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        assert done.returncode == 0 and " passed" in summary and "skipped" not in summary, done.stdout[-6000:]
        print(summary)
