"""Tiled InfoNCE (sslscale.kernels): chunked PyTorch and Triton vs the naive reference.

Values and gradients on random inputs, shapes that are not multiples of the tile, with and
without an excluded column, positives anywhere; bf16 inputs with documented tolerances; the
Triton kernels under ``TRITON_INTERPRET=1`` on CPU (fp32, and bf16 through the interpreter's
float32 upcast), their column split and feature chunks included; the CUDA runs of the kernels
are in ``tests/gpu/test_triton_infonce.py``. Memory: the chunked path's peak above the inputs,
counted per live storage (allocator-independent), is linear in the batch.

Tolerances: fp32 paths agree with the reference to float32 rounding (values 1e-5, gradients
1e-5 relative to their largest entry). bf16 inputs are compared with the reference on the same
values upcast to float32: the chunked path and the interpreter upcast every tile, so values agree
to 1e-4 and gradients to one bf16 rounding (2^-8 of the largest entry).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sslscale.kernels import info_nce, info_nce_chunked, info_nce_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
T = 0.1


def make_inputs(M, N, D, *, exclude=True, dtype=torch.float32, device="cpu", seed=0):
    """Unit-norm rows (M, D) / cols (N, D), random positives, an exclude column != positive."""
    g = torch.Generator().manual_seed(seed)
    rows = F.normalize(torch.randn(M, D, generator=g), dim=-1).to(device, dtype)
    cols = F.normalize(torch.randn(N, D, generator=g), dim=-1).to(device, dtype)
    pos = torch.randint(0, N, (M,), generator=g)
    ex = (pos + 1 + torch.randint(0, N - 1, (M,), generator=g)) % N if exclude else None
    weights = torch.randn(M, generator=g)  # upstream gradient: a weighted sum, not a plain mean
    return rows, cols, pos.to(device), None if ex is None else ex.to(device), weights.to(device)


def loss_and_grads(fn, rows, cols, pos, ex, weights, cols_grad=True, **kw):
    rows = rows.detach().clone().requires_grad_()
    cols = cols.detach().clone().requires_grad_(cols_grad)
    loss = fn(rows, cols, pos, temperature=T, exclude=ex, **kw)
    (loss * weights).sum().backward()
    return loss.detach(), rows.grad, cols.grad


def assert_close(got, want, *, value_atol, grad_rel):
    (lg, rg, cg), (lw, rw, cw) = got, want
    assert lg.dtype == torch.float32 and lg.shape == lw.shape
    torch.testing.assert_close(lg, lw.float(), atol=value_atol, rtol=0)
    for g, w in ((rg, rw), (cg, cw)):
        scale = w.float().abs().max().item()
        torch.testing.assert_close(g.float(), w.float(), atol=grad_rel * scale, rtol=0)


SHAPES = [  # (M, N, D, block_rows, block_cols): non-multiples, single tile, M < N (multi-rank)
    (37, 75, 24, 16, 32), (64, 64, 16, 16, 16), (5, 130, 40, 4, 64), (50, 50, 8, 1024, 2048),
]


@pytest.mark.parametrize("exclude", [True, False])
@pytest.mark.parametrize("M,N,D,br,bc", SHAPES)
def test_chunked_matches_reference_fp32(M, N, D, br, bc, exclude):
    args = make_inputs(M, N, D, exclude=exclude)
    got = loss_and_grads(info_nce_chunked, *args, block_rows=br, block_cols=bc)
    want = loss_and_grads(info_nce_reference, *args)
    assert_close(got, want, value_atol=1e-5, grad_rel=1e-5)


def test_simclr_layout_and_auto_dispatch():
    """2B rows against themselves, self excluded, positive = the other view (NT-Xent)."""
    B, D = 24, 16
    z = make_inputs(2 * B, 2 * B, D)[0]
    idx = torch.arange(2 * B)
    pos = (idx + B) % (2 * B)
    weights = torch.ones(2 * B) / (2 * B)
    want = loss_and_grads(info_nce_reference, z, z, pos, idx, weights)
    got = loss_and_grads(info_nce, z, z, pos, idx, weights)  # auto -> chunked on CPU
    assert_close(got, want, value_atol=1e-5, grad_rel=1e-5)


def test_chunked_bf16_inputs():
    rows, cols, pos, ex, w = make_inputs(40, 70, 32, dtype=torch.bfloat16)
    got = loss_and_grads(info_nce_chunked, rows, cols, pos, ex, w, block_rows=16, block_cols=32)
    want = loss_and_grads(info_nce_reference, rows.float(), cols.float(), pos, ex, w)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    assert_close(got, want, value_atol=1e-4, grad_rel=2 ** -8)


def test_grad_of_rows_only_when_cols_are_constant():
    """MoCo v3: keys from the momentum encoder carry no gradient."""
    rows, cols, pos, ex, _ = make_inputs(20, 33, 8, exclude=False)
    r1, r2 = rows.clone().requires_grad_(), rows.clone().requires_grad_()
    info_nce_chunked(r1, cols, pos, temperature=T, block_rows=8, block_cols=8).sum().backward()
    info_nce_reference(r2, cols, pos, temperature=T).sum().backward()
    torch.testing.assert_close(r1.grad, r2.grad, atol=1e-5, rtol=0)


def test_chunked_saves_no_logits():
    """The autograd graph holds inputs + (M,) lse, never an (M, N) tensor (the reference does)."""
    M = N = 256
    rows, cols, pos, ex, _ = make_inputs(M, N, 8)
    rows.requires_grad_()

    def saved_bytes(fn, **kw):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: sizes.append(t.numel() * t.element_size()) or t, lambda t: t):
            fn(rows, cols, pos, temperature=T, exclude=ex, **kw)
        return sum(sizes)

    inputs = (M + N) * 8 * 4 + 2 * M * 8
    assert saved_bytes(info_nce_chunked, block_rows=32, block_cols=32) <= inputs + M * 4
    assert saved_bytes(info_nce_reference) >= M * N * 4


class LiveMemory(TorchDispatchMode):
    """Peak bytes of the storages created inside the mode and alive at once (checked after each
    op: an allocator-independent peak, unlike RSS), and the largest float32 storage created.
    Storages that existed before (the inputs, views of them) are not counted."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.before: set[int] = set()
        self.peak = self.largest_fp32 = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.live:
                self.before.add(t.untyped_storage().data_ptr())
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            ptr = t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None
            if ptr is None or ptr in self.before or (
                    ptr in self.live and not self.live[ptr][0].expired()):
                continue
            self.live[ptr] = (StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes())
            if t.dtype == torch.float32:
                self.largest_fp32 = max(self.largest_fp32, t.untyped_storage().nbytes())
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def live_memory(fn, rows, cols, pos, ex, **kw) -> LiveMemory:
    """Forward + backward of ``fn(...).mean()`` under :class:`LiveMemory`."""
    with LiveMemory() as mem:
        fn(rows, cols, pos, temperature=T, exclude=ex, **kw).mean().backward()
    return mem


@pytest.mark.parametrize("same", [True, False])
def test_chunked_extra_memory_is_linear_in_batch(same):
    """Peak memory above the inputs (forward + backward, gradients included) is the (N, D)
    float32 gradient buffer (+ (M, D) when rows are another tensor), one tile and a few
    (block_rows, D) and (M,) temporaries: linear in B, where the naive loss grows as B^2."""
    D, br, bc = 16, 64, 64
    for N in (256, 512, 1024):
        M = N if same else N // 8
        z = F.normalize(torch.randn(N, D, generator=torch.Generator().manual_seed(N)), dim=-1)
        rows, cols = (z, z) if same else (z[:M].clone(), z.clone())
        rows.requires_grad_(), cols.requires_grad_()
        pos, ex = (torch.arange(M) + N // 2) % N, torch.arange(M)
        mem = live_memory(info_nce_chunked, rows, cols, pos, ex, block_rows=br, block_cols=bc)
        bound = 4 * (N * D + (0 if same else M * D) + br * bc + 6 * br * D + 8 * M)
        assert mem.peak <= bound, (N, mem.peak, bound)
        assert live_memory(info_nce_reference, rows, cols, pos, ex).peak >= 2 * M * N * 4


def test_chunked_bf16_converts_only_picked_rows():
    """MoCo's keys (bf16, no gradient): no float32 copy of all N x D columns is ever made."""
    rows, cols, pos, _, _ = make_inputs(32, 512, 16, exclude=False, dtype=torch.bfloat16)
    rows.requires_grad_()
    mem = live_memory(info_nce_chunked, rows, cols, pos, None, block_rows=16, block_cols=64)
    assert mem.largest_fp32 < 512 * 16 * 4
    assert mem.largest_fp32 <= max(16 * 64, 32 * 16) * 4


def test_chunked_one_tensor_for_rows_and_cols():
    """NT-Xent passes the same tensor as rows and cols: one gradient buffer, the same gradient."""
    z = make_inputs(48, 48, 16)[0]
    idx = torch.arange(48)
    grads = []
    chunked = (info_nce_chunked, dict(block_rows=16, block_cols=32))
    for fn, kw in (chunked, (info_nce_reference, {})):
        leaf = z.clone().requires_grad_()
        fn(leaf, leaf, (idx + 24) % 48, temperature=T, exclude=idx, **kw).mean().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (dict(positives=torch.tensor([0, 9])), r"positives must index columns in \[0, 4\)"),
    (dict(positives=torch.tensor([0, 1], dtype=torch.int32)), "positives must be int64"),
    (dict(exclude=torch.tensor([0])), r"exclude must be int64 of shape \(2,\)"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(cols=torch.randn(4, 5)), "share the feature dim"),
    (dict(impl="flash"), "impl must be one of"),
])
def test_bad_inputs_name_the_argument(bad, match):
    kw = dict(rows=torch.randn(2, 3), cols=torch.randn(4, 3), positives=torch.tensor([0, 1]),
              temperature=T, exclude=None, impl="chunked") | bad
    with pytest.raises(ValueError, match=match):
        info_nce(kw.pop("rows"), kw.pop("cols"), kw.pop("positives"), **kw)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed (pip install '.[kernels]')")
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        info_nce(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1]), temperature=T,
                 impl="triton")


def test_triton_launch_plan_fills_the_gpu(monkeypatch):
    """Pure Python (no triton, no GPU): the column split and the feature block."""
    from sslscale.kernels import infonce_triton as kt

    monkeypatch.setattr(kt, "_num_sms", lambda index: 132)  # H100 SXM
    cuda = torch.device("cuda", 0)
    for M, N in ((256, 8192), (256, 32768), (1024, 4096), (64, 1000)):
        split = kt.split_cols(M, N, cuda)
        programs = -(-M // 128) * -(-N // split)  # at the largest row tile
        assert split % 128 == 0 and split >= min(kt.MIN_SPLIT_N, N), (M, N, split)
        assert programs >= min(132, N // kt.MIN_SPLIT_N), (M, N, programs)
    assert kt.split_cols(32768, 32768, cuda) == 32768  # 256 row blocks fill 132 SMs: no split
    assert kt.split_cols(256, 8192, torch.device("cpu")) == 8192
    assert [kt.block_d(d) for d in (8, 24, 128, 200, 256)] == [16, 32, 128, 256, 256]


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed (pip install '.[kernels]')")
def test_triton_kernels_compile_for_hopper(monkeypatch):
    """No GPU needed: Triton's whole pipeline down to an sm_90 cubin (ptxas from the wheel), for
    one autotune config of each kernel; tensor-core instructions, no register spills."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    from sslscale.kernels import _infonce_tl
    from sslscale.kernels.compile_check import compile_kernel
    from sslscale.kernels.infonce_triton import TUNE_TILES

    if _infonce_tl.INTERPRETED:
        pytest.skip("this process imported the kernels interpreted")
    for name in ("fwd", "rows", "cols"):
        m, n, w = TUNE_TILES[name][128][0]
        info = compile_kernel(name, block_d=128, block_m=m, block_n=n, num_warps=w)
        assert info["tensor_cores"] and info["spill_bytes"] == 0, (name, info)


# --- Triton kernels under the interpreter (CPU) ------------------------------------------------
# triton decorates its own library at import, and torch imports triton early: interpreted kernels
# need TRITON_INTERPRET=1 before Python starts. So one child process runs every interpreter case
# (``interpreter_report``) and the tests below check its errors.

INTERPRETER_CASES = {  # name: (M, N, D, exclude, dtype, grad of cols, config)
    # INTERPRET_CONFIG: 32-wide tiles, 64 columns per program (N = 75: two column ranges)
    "fp32-37x75x40-default-tile": (37, 75, 40, True, "float32", True, None),
    "fp32-37x75x40-no-exclude": (37, 75, 40, False, "float32", True, None),
    "fp32-33x50x72-d-padded": (33, 50, 72, True, "float32", True,  # feature block 128
                               {"BLOCK_M": 16, "BLOCK_N": 32}),
    "fp32-16x16x16-one-tile": (16, 16, 16, False, "float32", True, {"BLOCK_M": 16, "BLOCK_N": 16}),
    "fp32-20x40x24-rows-only": (20, 40, 24, False, "float32", False, None),
    "bf16-20x45x24-upcast": (20, 45, 24, True, "bfloat16", True, None),
    # column ranges that are not multiples of the tile (48 = 32 + 16), a short last range
    "fp32-12x100x24-split-48": (12, 100, 24, True, "float32", True,
                                {"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT_N": 48}),
    # one column per program: every row has a range holding only its excluded column (-inf)
    "fp32-8x24x16-split-1": (8, 24, 16, True, "float32", True,
                             {"BLOCK_M": 16, "BLOCK_N": 16, "SPLIT_N": 1}),
    "bf16-16x130x40-split-32": (16, 130, 40, True, "bfloat16", True,
                                {"BLOCK_M": 16, "BLOCK_N": 16, "SPLIT_N": 32}),
    # wider than MAX_D = 256: the chunked version runs
    "fp32-10x40x300-wide": (10, 40, 300, True, "float32", True, None),
}


def interpreter_report() -> None:
    """Child process (TRITON_INTERPRET=1): print JSON {case: errors} of Triton vs the reference.

    Errors: ``value`` max abs loss error; ``rows`` / ``cols`` max abs gradient error over the
    reference gradient's largest entry; ``dtypes`` of the gradients."""
    import json

    from sslscale.kernels.infonce_triton import info_nce_triton

    report = {}
    for name, (M, N, D, exclude, dtype, grad_cols, config) in INTERPRETER_CASES.items():
        rows, cols, pos, ex, w = make_inputs(M, N, D, exclude=exclude, dtype=getattr(torch, dtype),
                                             seed=M)
        got = loss_and_grads(info_nce_triton, rows, cols, pos, ex, w, config=config,
                             cols_grad=grad_cols)
        want = loss_and_grads(info_nce_reference, rows.float(), cols.float(), pos, ex, w,
                              cols_grad=grad_cols)
        errors = {"value": (got[0] - want[0]).abs().max().item(),
                  "dtypes": [str(g.dtype) for g in got[1:] if g is not None]}
        for key, g, r in (("rows", got[1], want[1]), ("cols", got[2], want[2])):
            if r is not None:
                errors[key] = ((g.float() - r).abs().max() / r.abs().max()).item()
            else:
                errors[key] = None if g is None else "unexpected gradient"
        report[name] = errors
    print(json.dumps(report))


@pytest.fixture(scope="module")
def interpreted() -> dict:
    if not HAS_TRITON:
        pytest.skip("triton not installed (pip install '.[kernels]')")
    root = Path(__file__).resolve().parents[2]
    code = "from tests.unit.test_infonce import interpreter_report; interpreter_report()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(INTERPRETER_CASES))
def test_triton_interpreter_matches_reference(interpreted, case):
    errors = interpreted[case]
    bf16 = INTERPRETER_CASES[case][4] == "bfloat16"
    assert errors["value"] <= (1e-4 if bf16 else 1e-5)
    assert errors["rows"] <= (2 ** -8 if bf16 else 1e-5)
    if INTERPRETER_CASES[case][5]:
        assert errors["cols"] <= (2 ** -8 if bf16 else 1e-5)
    else:
        assert errors["cols"] is None  # keys without gradient: the d cols kernel never ran
    assert set(errors["dtypes"]) == {"torch." + INTERPRETER_CASES[case][4]}
