"""Compile the kernels ahead of time for a GPU architecture, without a GPU.

Triton's wheel ships ``ptxas``, so ``triton.compile`` can lower a kernel to a cubin for
``sm_90`` (Hopper) on a CPU-only machine. That catches what the CPU interpreter cannot:
code that does not lower to PTX, and tile configurations that need more shared memory than
the SM has. It says nothing about speed.

    TRITON_INTERPRET=0 python -m soda_kernels.compile_check          # a representative set
    TRITON_INTERPRET=0 python -m soda_kernels.compile_check --all    # every autotune config

Prints one JSON line per compiled (kernel, dtype, config): the shared memory the compiler
allocated, the estimate the autotune pruning uses (``None`` where it has none), and the
number of async global-to-shared copies in the main loop (> 0: the loop is software-
pipelined, loads overlapping the tensor-core work).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

SMEM_PER_BLOCK_SM90 = 227 * 1024  # H100 / H200: opt-in shared memory per thread block


def _compile(fn, types: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int):
    """(shared bytes, async copies in the TTGIR) of ``fn`` compiled as the JIT would at run
    time: pointers and integer arguments marked divisible by 16 (torch allocations, H, the
    slice width and the padded row count are; see ``row_multiple``), unit strides constant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: ("constexpr" if name in constexprs else types[name]) for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name not in constexprs and (types[name].startswith("*") or types[name] == "i32")}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    return kernel.metadata.shared, kernel.asm["ttgir"].count("async_copy_global_to_local")


def cases(all_configs: bool):
    """(name, dtype, fn, types, constexprs, config, smem estimate) to compile."""
    import soda_kernels.fused_linear_cross_entropy as flce
    import soda_kernels.interleaved_embedding as emb

    out = []
    for dt in ("bf16", "fp32"):
        p, elt = f"*{dt}", 2 if dt == "bf16" else 4
        prec = "tf32" if dt == "bf16" else "ieee"
        mm = dict(a_ptr=p, b_ptr=p, c_ptr="*fp32", M="i32", N="i32", K="i32", stride_am="i32",
                  stride_ak="i32", stride_bk="i32", stride_bn="i32", stride_cm="i32",
                  stride_cn="i32", KEY_H="i32", KEY_V="i32")
        dl = dict(h_ptr=p, w_ptr=p, label_ptr="*i64", lse_ptr="*fp32", g_ptr="*fp32", dl_ptr=p,
                  N="i32", H="i32", n_cols="i32", col_start="i32", z_loss="fp32", stride_h="i32",
                  stride_w="i32", stride_dl="i32", KEY_V="i32")
        lse = dict(h_ptr=p, w_ptr=p, label_ptr="*i64", m_ptr="*fp32", s_ptr="*fp32",
                   t_ptr="*fp32", N="i32", H="i32", n_valid="i32", vocab_start="i32",
                   splits="i32", stride_h="i32", stride_w="i32")
        for name, fn, types, configs, dims, extra in (
                # grad_W = dlogits^T h_a (A transposed) and grad_h = dlogits W (A row-major)
                ("matmul_grad_weight", flce._matmul_kernel, mm, flce._MATMUL_CONFIGS,
                 ("BLOCK_M", "BLOCK_K", "BLOCK_N"),
                 {"ACCUMULATE": True, "stride_am": 1, "stride_bn": 1, "stride_cn": 1}),
                ("matmul_grad_hidden", flce._matmul_kernel, mm, flce._MATMUL_CONFIGS,
                 ("BLOCK_M", "BLOCK_K", "BLOCK_N"),
                 {"ACCUMULATE": True, "stride_ak": 1, "stride_bn": 1, "stride_cn": 1}),
                ("grad_logits", flce._grad_logits_kernel, dl, flce._DLOGITS_CONFIGS,
                 ("BLOCK_N", "BLOCK_H", "BLOCK_V"), {}),
                ("lse_partials", flce._lse_partials_kernel, lse, flce._LSE_CONFIGS,
                 ("BLOCK_N", "BLOCK_H", "BLOCK_V"), {})):
            chosen = configs if all_configs else configs[:1]
            if not all_configs and dt == "fp32":
                continue  # the bf16 configs are the production path
            for cfg in chosen:
                a, k, b = (cfg.kwargs[d] for d in dims)
                est = (a + b) * k * elt * cfg.num_stages
                consts = dict(cfg.kwargs, UPCAST=False, PRECISION=prec, **extra)
                out.append((name, dt, fn, types, consts, (cfg.num_warps, cfg.num_stages), est))
    for dt in ("bf16",) if not all_configs else ("bf16", "fp32"):
        pieces = dict(keys_ptr="*i64", perm_ptr="*i64", grad_ptr=f"*{dt}", dw_ptr=f"*{dt}",
                      head_ptr="*fp32", tail_ptr="*fp32", N="i32", H="i32", V_local="i32",
                      stride_g="i32", stride_dw="i32", stride_p="i32")
        merge = dict(keys_ptr="*i64", dw_ptr=f"*{dt}", head_ptr="*fp32", tail_ptr="*fp32",
                     N="i32", H="i32", V_local="i32", stride_dw="i32", stride_p="i32")
        blocks = dict(PIECE=64, BLOCK_H=64)
        out.append(("embedding_pieces", dt, emb._embedding_bwd_pieces_kernel, pieces, blocks,
                    (4, 1), None))
        out.append(("embedding_merge", dt, emb._embedding_bwd_merge_kernel, merge, blocks,
                    (4, 1), None))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every autotune config, both dtypes")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    failed = 0
    for name, dt, fn, types, consts, (warps, stages), est in cases(args.all):
        row = {"kernel": name, "dtype": dt, "config": {k: v for k, v in consts.items()
                                                      if k.isupper() and k != "PRECISION"
                                                      or k.startswith("stride")},
               "num_warps": warps, "num_stages": stages, "smem_estimate": est}
        try:
            row["smem"], row["async_copies"] = _compile(fn, types, consts, warps, stages,
                                                        args.arch)
            row["fits"] = row["smem"] <= SMEM_PER_BLOCK_SM90
        except Exception as err:  # noqa: BLE001 - reported per kernel
            row["error"] = f"{type(err).__name__}: {err}"[:500]
            failed += 1
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
