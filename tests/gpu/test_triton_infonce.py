"""The Triton InfoNCE kernels on CUDA against the naive reference (skipped without CUDA / triton).

bf16 inputs are compared with the reference on the same values upcast to float32: logits agree
to float32 rounding (bf16 x bf16 products are exact in float32), gradients to 2e-2 of their
largest entry (the kernels feed bf16 probabilities to the tensor cores for the second product,
as FlashAttention does). float32 with ``precision="ieee"``: float32 rounding; with the default
TF32 dot products: ~1e-3 / T on the logits.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ..unit.test_infonce import T, assert_close, loss_and_grads, make_inputs
from sslscale.kernels import info_nce, info_nce_chunked, info_nce_reference

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and importlib.util.find_spec("triton") is not None),
    reason="needs CUDA and triton")


@pytest.fixture(autouse=True)
def exact_torch_matmuls(monkeypatch):
    """The reference's float32 matmuls in full precision, whatever the process set before."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def triton_fn(**fixed):
    from sslscale.kernels.infonce_triton import info_nce_triton

    return lambda *a, **kw: info_nce_triton(*a, **kw, **fixed)


FORCED = {"BLOCK_M": 64, "BLOCK_N": 64}  # one compile per case instead of an autotuning sweep


@pytest.mark.parametrize("M,N,D,exclude,config", [
    (256, 8192, 256, True, None),     # distributed, autotuned (as bench/infonce.py and SimCLR)
    (300, 1000, 128, True, FORCED),   # not multiples of any tile
    (1000, 1000, 128, False, FORCED),  # NT-Xent-sized, no exclusion
    (2048, 2048, 64, True, FORCED),   # enough row blocks: no column split
    (128, 4096, 384, True, None),     # D > MAX_D: the chunked version
])
def test_bf16_matches_reference(M, N, D, exclude, config):
    rows, cols, pos, ex, w = make_inputs(M, N, D, exclude=exclude, dtype=torch.bfloat16,
                                         device="cuda")
    got = loss_and_grads(triton_fn(config=config), rows, cols, pos, ex, w)
    want = loss_and_grads(info_nce_reference, rows.float(), cols.float(), pos, ex, w)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    assert_close(got, want, value_atol=2e-3, grad_rel=2e-2)


def test_ntxent_one_tensor_and_rows_only():
    """rows is cols (single-GPU NT-Xent); MoCo's keys without gradient."""
    B, D = 512, 256
    z = make_inputs(B, B, D, dtype=torch.bfloat16, device="cuda")[0]
    idx = torch.arange(B, device="cuda")
    grads = []
    for fn in (info_nce, info_nce_reference):
        leaf = (z.float() if fn is info_nce_reference else z).clone().requires_grad_()
        fn(leaf, leaf, (idx + B // 2) % B, temperature=T, exclude=idx).mean().backward()
        grads.append(leaf.grad.float())
    scale = grads[1].abs().max().item()
    torch.testing.assert_close(grads[0], grads[1], atol=2e-2 * scale, rtol=0)
    rows, cols, pos, _, w = make_inputs(256, 2048, 128, exclude=False, dtype=torch.bfloat16,
                                        device="cuda")
    got = loss_and_grads(triton_fn(config=FORCED), rows, cols, pos, None, w, cols_grad=False)
    want = loss_and_grads(info_nce_reference, rows.float(), cols.float(), pos, None, w,
                          cols_grad=False)
    assert got[2] is None and want[2] is None
    torch.testing.assert_close(got[0], want[0], atol=2e-3, rtol=0)


def test_fp32_ieee_is_exact_and_tf32_close():
    args = make_inputs(200, 3333, 128, device="cuda")
    want = loss_and_grads(info_nce_reference, *args)
    exact = loss_and_grads(triton_fn(config=FORCED, precision="ieee"), *args)
    assert_close(exact, want, value_atol=1e-4, grad_rel=1e-4)
    tf32 = loss_and_grads(triton_fn(config=FORCED), *args)  # the default for float32 inputs
    assert_close(tf32, want, value_atol=2e-2, grad_rel=2e-2)


@pytest.mark.parametrize("split_n", [128, 300, 4096])
def test_forced_column_splits_agree(split_n):
    """The same tiles with the columns cut into 128- / 300-wide ranges, or not cut."""
    args = make_inputs(64, 4096, 128, device="cuda")
    config = {**FORCED, "SPLIT_N": split_n}
    got = loss_and_grads(triton_fn(config=config, precision="ieee"), *args)
    want = loss_and_grads(info_nce_reference, *args)
    assert_close(got, want, value_atol=1e-4, grad_rel=1e-4)


def test_chunked_on_cuda_matches_reference():
    args = make_inputs(300, 2500, 64, device="cuda")
    got = loss_and_grads(info_nce_chunked, *args, block_rows=128, block_cols=1024)
    want = loss_and_grads(info_nce_reference, *args)
    assert_close(got, want, value_atol=1e-4, grad_rel=1e-4)


def test_split_plan_fills_this_gpu():
    from sslscale.kernels.infonce_triton import _num_sms, split_cols

    sms = _num_sms(torch.cuda.current_device())
    split = split_cols(256, 32768, torch.device("cuda"))
    assert 2 * (32768 // split) >= sms, (sms, split)  # 2 row blocks of 128 x the column ranges
