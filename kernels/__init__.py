"""soda_kernels: Triton kernels of soda-mega (installed from the top-level ``kernels/`` folder).

The import name is ``soda_kernels`` because an unrelated PyPI package is called ``kernels``.
Each ``<op>.py`` holds the ``@triton.jit`` kernels, their launchers, the autograd function, the
public function and ``<op>_reference()`` in plain PyTorch.
"""
