"""soda_kernels: Triton kernels of soda-mega (installed from the top-level ``kernels/`` folder).

The import name is ``soda_kernels`` because an unrelated PyPI package is called ``kernels``.
Each op's public function, autograd function and ``<op>_reference()`` in plain PyTorch live in
``<op>.py``; a small op keeps its ``@triton.jit`` kernels and launchers there too, the fused
linear cross-entropy splits them into ``flce_*`` modules of one idea each (kernels, tuning,
launches, recompute backward, training path, plan, roofline, the measured choice), plus
``gemm_engine`` (its plain GEMMs on the Triton matmul or cuBLAS), all used through
``fused_linear_cross_entropy``.
"""
