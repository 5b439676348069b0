"""Compile the InfoNCE Triton kernels for an NVIDIA GPU on a machine without one.

Owns :func:`compile_kernel` and :func:`report`: Triton's whole pipeline (frontend, TTGIR, PTX,
``ptxas`` from the triton wheel) for a target such as ``sm_90`` (H100 / H200), with the register
and spill counts ``cuobjdump`` reads from the cubin. It checks that every autotune config of
:data:`sslscale.kernels.infonce_triton.TUNE_TILES` compiles, uses the tensor cores (``mma`` /
``wgmma`` in the PTX) and does not spill, before a GPU is lent. Needs triton (not interpreted).

    python -m sslscale.kernels.compile_check [--capability 90]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

from sslscale.kernels import infonce_triton

_ARGS = {  # kernel -> its runtime arguments, in order (names as in _infonce_tl)
    "fwd": ["R", "C", "EXCL", "LSE_PART", "M", "N", "D", "stride_r", "stride_c", "scale_log2",
            "SPLIT_N"],
    "rows": ["R", "C", "EXCL", "LSE", "G", "DR_PART", "M", "N", "D", "stride_r", "stride_c",
             "scale_log2", "SPLIT_N"],
    "cols": ["R", "C", "EXCL", "LSE", "G", "DC", "M", "N", "D", "stride_r", "stride_c",
             "stride_dc", "scale_log2"],
}
_TYPES = {"EXCL": "*i64", "LSE_PART": "*fp32", "LSE": "*fp32", "G": "*fp32", "DR_PART": "*fp32",
          "DC": "*fp32", "scale_log2": "fp32"}  # R, C: the input dtype; the rest int32


def compile_kernel(name: str, *, dtype: str = "bf16", block_d: int = 128, block_m: int = 64,
                   block_n: int = 64, num_warps: int = 4, num_stages: int | None = None,
                   has_excl: bool = True, precision: str = "ieee", capability: int = 90) -> dict:
    """Compile kernel ``name`` ("fwd", "rows", "cols") for ``sm_<capability>`` with float
    inputs ``dtype`` ("bf16", "fp16", "fp32"); ``num_stages`` defaults to the autotuner's.
    Returns ``{"regs", "spill_bytes", "shared" (bytes), "tensor_cores"}``. Raises what triton
    raises for a kernel that does not compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sslscale.kernels import _infonce_tl

    if _infonce_tl.INTERPRETED:
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset")
    fn = {"fwd": _infonce_tl._lse_fwd_kernel, "rows": _infonce_tl._bwd_rows_kernel,
          "cols": _infonce_tl._bwd_cols_kernel}[name]
    signature = {a: _TYPES.get(a, f"*{dtype}" if a in ("R", "C") else "i32") for a in _ARGS[name]}
    constexprs = {"HAS_EXCL": has_excl, "UPCAST": False, "PRECISION": precision,
                  "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d}
    signature.update({k: "constexpr" for k in constexprs})
    src = ASTSource(fn, signature,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    if num_stages is None:  # as infonce_triton._tuned
        num_stages = 3 if name == "fwd" and dtype != "fp32" else 2
    kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return {"regs": int(regs.group(1)) if regs else None,
            "spill_bytes": int(stack.group(1)) if stack else None,
            "shared": kernel.metadata.shared,
            "tensor_cores": bool(re.search(r"\b(wgmma|mma)\.", kernel.asm["ptx"]))}


def report(capability: int = 90, dtypes=("bf16", "fp32")) -> list[dict]:
    """Every autotune config of every kernel and feature block, compiled; one dict each (the
    config, then :func:`compile_kernel`'s result), printed as it goes."""
    rows = []
    for dtype in dtypes:
        precision = "tf32" if dtype == "fp32" else "ieee"
        for name, by_block in infonce_triton.TUNE_TILES.items():
            for block_d, tiles in by_block.items():
                for m, n, w in tiles:
                    cfg = {"kernel": name, "dtype": dtype, "BLOCK_D": block_d, "BLOCK_M": m,
                           "BLOCK_N": n, "num_warps": w}
                    row = {**cfg, **compile_kernel(name, dtype=dtype, block_d=block_d, block_m=m,
                                                   block_n=n, num_warps=w, precision=precision,
                                                   capability=capability)}
                    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
                    rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capability", type=int, default=90, help="e.g. 80 (A100), 90 (H100)")
    parser.add_argument("--dtypes", default="bf16,fp32")
    args = parser.parse_args()
    rows = report(args.capability, tuple(args.dtypes.split(",")))
    spilling = [r for r in rows if r["spill_bytes"]]
    print(f"{len(rows)} configs compiled for sm_{args.capability}; "
          f"{len(spilling)} spill registers; "
          f"{sum(not r['tensor_cores'] for r in rows)} without tensor-core instructions")


if __name__ == "__main__":
    main()
