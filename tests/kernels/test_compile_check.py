"""The Triton kernels lower to sm_90 (Hopper) code, fit its shared memory, and their main
loops are software-pipelined, checked ahead of time on the CPU (soda_kernels.compile_check;
Triton's wheel ships ptxas). Says nothing about speed: that needs a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

from launch_env import clean_env


def test_kernels_compile_for_hopper_pipelined_and_within_shared_memory():
    env = dict(clean_env(), TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "soda_kernels.compile_check"], env=env,
                          capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kernels = {r["kernel"] for r in rows}
    assert {"matmul_grad_weight", "matmul_grad_hidden", "grad_logits", "lse_partials",
            "embedding_pieces", "embedding_merge"} <= kernels
    for r in rows:
        assert "error" not in r and r["fits"], r
        if r["smem_estimate"] is not None:  # the autotune pruning's estimate is an upper bound
            assert r["smem"] <= r["smem_estimate"], r
            assert r["async_copies"] > 0, f"{r['kernel']}: main loop not pipelined"
