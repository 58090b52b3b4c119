"""The Triton kernels (``peft_sparse.kernels``) against their torch references, and the backend dispatch.

The kernels run here on CPU tensors in Triton's interpreter. ``TRITON_INTERPRET=1`` must be in the environment
before triton is first imported (``triton.language`` builds its own jit functions for one mode at import), and
torch imports triton early (conftest's imports already have), so when this module is collected without it the
kernel tests (``TestKernels``) run in one subprocess started with it: ``test_kernels_in_the_interpreter``.
To run them directly: ``TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peft_sparse import SparseMaskConfig, kernels, sparse

from tiny_models import VOCAB, make_batch

ROOT = Path(__file__).resolve().parents[1]


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
        support = sparse.random_support(shape, shape[0] * shape[1] // 6, g)
    else:
        grid = (-(-shape[0] // block_size), -(-shape[1] // block_size))
        total = grid[0] * grid[1]
        ids = torch.randperm(total, generator=g)[: max(2, total // 3)]
        ids = torch.unique(torch.cat([ids, torch.tensor([grid[1] - 1, total - 1])]))  # an edge block and the corner
        support = sparse.block_support(ids, shape, block_size)
    delta = sparse.SparseDelta(shape, support, dtype, block_size=block_size)
    with torch.no_grad():
        delta.values.normal_(generator=g)
    return delta


def uses_block_kernels(delta: sparse.SparseDelta) -> bool:
    pattern = delta.block_pattern()
    return pattern is not None and pattern.block_size in (16, 32, 64, 128)


# --------------------------------------------------------------------------- layout and dispatch (no triton)


def test_block_pattern_describes_whole_block_supports():
    delta = make_delta("block16-edges")
    pattern = delta.block_pattern()
    assert pattern is not None and pattern.block_size == 16
    assert torch.equal(sparse.block_support(pattern.rows * 4 + pattern.cols, delta.shape, 16), delta.indices)
    # Block-major positions of the row-major values: the blocks of the dense ΔW, -1 outside the weight.
    index = delta.block_value_index()
    assert index.shape == (pattern.rows.numel(), 16, 16)
    dense = torch.nn.functional.pad(delta.dense(), (0, 64 - 56, 0, 48 - 40))
    for k, (br, bc) in enumerate(zip(pattern.rows.tolist(), pattern.cols.tolist())):
        block = dense[br * 16:(br + 1) * 16, bc * 16:(bc + 1) * 16]
        inside = index[k] >= 0
        assert torch.equal(delta.values.detach()[index[k][inside]], block[inside])
        assert inside.sum() == (min(40, br * 16 + 16) - br * 16) * (min(56, bc * 16 + 16) - bc * 16)
    assert sorted(index[index >= 0].tolist()) == list(range(delta.numel_support))
    # CSC order, for grad_x = grad @ ΔW.
    ccol, row, order = delta.csc_pattern()
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
    delta.set_support(sparse.block_support(torch.tensor([5]), delta.shape, 16))
    assert delta.block_pattern().rows.tolist() == [1] and delta.block_pattern().cols.tolist() == [1]
    delta.block_size = 8  # a 16-block is four whole 8-blocks
    assert delta.block_pattern().block_size == 8 and delta.block_pattern().rows.numel() == 4
    with pytest.raises(ValueError, match="block_size"):
        sparse.SparseDelta((4, 4), torch.tensor([0]), torch.float32, block_size=0)


def test_backend_selection_and_repr(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.delenv("PEFT_SPARSE_BACKEND", raising=False)
    assert kernels.backend_for(x) == "torch"  # auto: torch on CPU tensors
    monkeypatch.setenv("PEFT_SPARSE_BACKEND", "torch")
    assert kernels.backend_for(x) == "torch"
    monkeypatch.setenv("PEFT_SPARSE_BACKEND", "Auto")
    assert kernels.backend_for(x) == "torch"
    delta = make_delta("block16-edges")
    assert "block_size=16" in repr(delta) and "backend=auto->torch" in repr(delta)
    monkeypatch.setenv("PEFT_SPARSE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="PEFT_SPARSE_BACKEND='cuda' is not one of auto, torch, triton"):
        kernels.backend_for(x)
    assert "backend='cuda'->invalid" in repr(delta)  # a repr never raises


def test_forcing_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PEFT_SPARSE_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    message = "PEFT_SPARSE_BACKEND=triton, but "
    if kernels.is_triton_available():
        message += "the tensors are on the CPU and TRITON_INTERPRET=1 is not set"
    with pytest.raises(RuntimeError, match=message):
        kernels.backend_for(torch.zeros(2, 3))
    delta = make_delta("unstructured-odd")
    assert "backend=triton->unavailable" in repr(delta)
    x = torch.randn(4, 23, requires_grad=True)
    with pytest.raises(RuntimeError, match="PEFT_SPARSE_BACKEND=triton"):
        sparse.sparse_delta_linear(x, delta.values, delta)


def test_forcing_triton_without_triton_installed_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # what `import triton` sees when it is not installed
    kernels.is_triton_available.cache_clear()  # the answer is cached per process; this test fakes another one
    assert not kernels.is_triton_available()
    monkeypatch.setenv("PEFT_SPARSE_BACKEND", "triton")
    with pytest.raises(RuntimeError, match=r"triton is not installed \(pip install 'peft_sparse\[triton\]'\)"):
        kernels.backend_for(torch.zeros(2, 3))
    monkeypatch.setenv("PEFT_SPARSE_BACKEND", "auto")
    assert kernels.backend_for(torch.zeros(2, 3)) == "torch"
    kernels.is_triton_available.cache_clear()


@pytest.mark.skipif(IN_INTERPRETER or not kernels.is_triton_available(), reason="needs triton, imported without TRITON_INTERPRET")
def test_setting_the_interpreter_after_triton_was_imported_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PEFT_SPARSE_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 was set after triton was imported"):
        kernels.backend_for(torch.zeros(2, 3))


def test_the_package_imports_and_trains_without_triton():
    """A fresh interpreter where ``import triton`` fails: the kernels package, its modules and the torch path."""
    code = """
import sys
sys.modules["triton"] = None
import torch
from peft_sparse import kernels, sparse
from peft_sparse.kernels import sddmm, spmm
assert not kernels.is_triton_available() and kernels.backend_for(torch.zeros(1)) == "torch"
delta = sparse.SparseDelta((6, 5), torch.tensor([1, 7, 12, 29]), torch.float32)
x = torch.randn(2, 3, 5, requires_grad=True)
sparse.sparse_delta_linear(x, delta.values, delta).sum().backward()
ref = sddmm.sddmm_reference(torch.ones(6, 6), x.detach().reshape(6, 5), delta.indices)
torch.testing.assert_close(delta.values.grad, ref)
print("ok")
"""
    env = {**os.environ, "PEFT_SPARSE_BACKEND": "auto"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
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
    def triton_backend(self, monkeypatch):
        pytest.importorskip("triton", minversion=INTERPRETER_MIN_TRITON, reason=INTERPRETER_SKIP_REASON)
        monkeypatch.setenv("PEFT_SPARSE_BACKEND", "triton")

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("name", SHAPES)
    def test_sddmm(self, name, dtype, monkeypatch):
        from peft_sparse.kernels import sddmm

        delta = make_delta(name)
        g = torch.Generator().manual_seed(1)
        grad = torch.randn(29, delta.shape[0], generator=g).to(dtype)
        x = torch.randn(29, delta.shape[1], generator=g).to(dtype)
        expected = sddmm.sddmm_reference(grad, x, delta.indices)
        got = sparse.sampled_grad(grad, x, delta)  # dispatches: the block kernel where the support allows
        assert got.dtype == torch.float32
        # Products of the inputs are exact in fp32, in every dtype: only the order of the sums differs.
        assert_close_scaled(got, expected, 1e-5)
        if uses_block_kernels(delta):  # the entry kernel serves block supports too
            assert_close_scaled(sddmm.sddmm_csr(grad, x, delta.indices, delta.shape[1]), expected, 1e-5)
        monkeypatch.setenv("PEFT_SPARSE_BACKEND", "torch")
        assert_close_scaled(sparse.sampled_grad(grad, x, delta), expected, 1e-5)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("name", SHAPES)
    def test_spmm_both_directions(self, name, dtype):
        from peft_sparse.kernels import spmm

        delta = make_delta(name)
        g = torch.Generator().manual_seed(2)
        x = torch.randn(21, delta.shape[1], generator=g).to(dtype)
        grad = torch.randn(21, delta.shape[0], generator=g).to(dtype)
        values = delta.values.detach()
        y = spmm.spmm(x, values, delta)
        grad_x = spmm.spmm_t(grad, values, delta)
        assert y.dtype == dtype and grad_x.dtype == dtype
        assert_close_scaled(y, spmm.spmm_reference(x, delta.indices, values, delta.shape), DTYPES[dtype])
        assert_close_scaled(grad_x, spmm.spmm_t_reference(grad, delta.indices, values, delta.shape), DTYPES[dtype])
        if uses_block_kernels(delta):  # the entry kernels serve block supports too
            assert_close_scaled(spmm.spmm_csr(x, values, delta), y, DTYPES[dtype])
            assert_close_scaled(spmm.spmm_t_csr(grad, values, delta), grad_x, DTYPES[dtype])

    def test_tokens_split_over_programs(self):
        """The token split (fp32 atomics), which a GPU uses when there are few entries or blocks."""
        from peft_sparse.kernels import sddmm

        for name in ("unstructured-odd", "block16-edges"):
            delta = make_delta(name)
            grad, x = torch.randn(70, delta.shape[0]), torch.randn(70, delta.shape[1])
            expected = sddmm.sddmm_reference(grad, x, delta.indices)
            got = sddmm.sddmm_csr(grad, x, delta.indices, delta.shape[1], split=3, block_t=16)
            assert_close_scaled(got, expected, 1e-5)
            if name != "unstructured-odd":
                got = sddmm.sddmm_bsr(grad, x, delta.block_pattern(), delta.shape, split=3, block_t=16)
                assert_close_scaled(got, expected, 1e-5)

    @pytest.mark.parametrize("tokens", [0, 5])
    def test_empty_supports_and_no_tokens(self, tokens):
        from peft_sparse.kernels import sddmm, spmm

        for name in ("unstructured-odd", "block16-edges"):
            delta = make_delta(name)
            if tokens:
                delta.set_support(torch.zeros(0, dtype=torch.int64))
            x, grad = torch.randn(tokens, delta.shape[1]), torch.randn(tokens, delta.shape[0])
            k = delta.numel_support
            torch.testing.assert_close(sddmm.sddmm(grad, x, delta), torch.zeros(k))
            torch.testing.assert_close(spmm.spmm(x, delta.values, delta), torch.zeros(tokens, delta.shape[0]))
            torch.testing.assert_close(spmm.spmm_t(grad, delta.values, delta), torch.zeros(tokens, delta.shape[1]))
            y = sparse.sparse_delta_linear(x.view(1, tokens, delta.shape[1]).requires_grad_(), delta.values, delta)
            y.sum().backward()
            assert y.shape == (1, tokens, delta.shape[0]) and delta.values.grad.shape == (k,)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("with_weight", [False, True], ids=["no-weight", "weight"])
    @pytest.mark.parametrize("name", ["unstructured-odd", "block16-edges"])
    def test_linear_on_3d_inputs_matches_the_torch_backend(self, name, with_weight, dtype, monkeypatch):
        """``sparse_delta_linear`` forward and backward: SpMM both ways (no weight: quantized bases) and SDDMM."""
        delta = make_delta(name, dtype=dtype)
        g = torch.Generator().manual_seed(3)
        x0 = torch.randn(2, 5, delta.shape[1], generator=g).to(dtype)
        weight = torch.randn(delta.shape, generator=g).to(dtype) if with_weight else None
        bias = torch.randn(delta.shape[0], generator=g).to(dtype)
        upstream = torch.randn(2, 5, delta.shape[0], generator=g).to(dtype)
        results = {}
        for backend in ("torch", "triton"):
            monkeypatch.setenv("PEFT_SPARSE_BACKEND", backend)
            delta.values.grad = None
            x = x0.clone().requires_grad_()
            y = sparse.sparse_delta_linear(x, delta.values, delta, weight, bias)
            (y * upstream).sum().backward()
            results[backend] = (y.detach(), x.grad, delta.values.grad)
        tol = DTYPES[dtype] * 4
        for expected, got in zip(results["torch"], results["triton"]):
            assert got.dtype == expected.dtype
            assert_close_scaled(got, expected, tol)

    @pytest.mark.parametrize("hidden", [32, 40], ids=["hidden32", "hidden40"])
    @pytest.mark.parametrize("block_size", [1, 16], ids=["entries", "blocks16"])
    def test_tiny_llama_gradients_match_the_torch_backend(self, block_size, hidden, monkeypatch):
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
            if delta.block_size == 1:  # until SparseMask's layer passes its block_size to SparseDelta
                delta.block_size = block_size
            assert (delta.block_pattern() is not None) == (block_size > 1)
            with torch.no_grad():
                delta.values.normal_(0, 0.02)
        batch = make_batch("llama", batch=2, seq=5)
        model.train()
        results = {}
        for backend in ("torch", "triton"):
            monkeypatch.setenv("PEFT_SPARSE_BACKEND", backend)
            model.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            results[backend] = (loss.detach(), {n: d.values.grad.clone() for n, d in deltas.items()})
        torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
        for name, expected in results["torch"][1].items():
            scale = expected.abs().max()
            assert_close_scaled(results["triton"][1][name] / scale, expected / scale, 1e-4)


@pytest.mark.skipif(
    IN_INTERPRETER or not torch.cuda.is_available() or not kernels.is_triton_available(),
    reason="needs a CUDA GPU and triton (the compiled kernels)",
)
def test_compiled_kernels_on_cuda():
    """The same checks as ``TestKernels``, on a GPU with the compiled kernels (skipped on CPU-only CI)."""
    from peft_sparse.kernels import sddmm, spmm

    for name in SHAPES:
        delta = make_delta(name).cuda()
        values = delta.values.detach()
        for dtype, tol in DTYPES.items():
            x = torch.randn(300, delta.shape[1], device="cuda").to(dtype)
            grad = torch.randn(300, delta.shape[0], device="cuda").to(dtype)
            expected = sddmm.sddmm_reference(grad, x, delta.indices)
            assert_close_scaled(sddmm.sddmm(grad, x, delta), expected, 1e-5)
            assert_close_scaled(sddmm.sddmm_csr(grad, x, delta.indices, delta.shape[1], split=3), expected, 1e-5)
            if uses_block_kernels(delta):
                assert_close_scaled(sddmm.sddmm_bsr(grad, x, delta.block_pattern(), delta.shape, split=3), expected,
                                    1e-5)
            assert_close_scaled(spmm.spmm(x, values, delta), spmm.spmm_reference(x, delta.indices, values, delta.shape),
                                tol)
            assert_close_scaled(spmm.spmm_t(grad, values, delta),
                                spmm.spmm_t_reference(grad, delta.indices, values, delta.shape), tol)


if not IN_INTERPRETER:
    # Collected without the interpreter: the kernel tests run in a subprocess that has it (module docstring).
    del TestKernels

    def test_kernels_in_the_interpreter():
        pytest.importorskip("triton", minversion=INTERPRETER_MIN_TRITON, reason=INTERPRETER_SKIP_REASON)
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        env.pop("PEFT_SPARSE_BACKEND", None)
        command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "TestKernels"]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        assert done.returncode == 0 and " passed" in summary and "skipped" not in summary, done.stdout[-6000:]
        print(summary)
