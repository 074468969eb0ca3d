"""Layout-independent weight initialisation: the same seed gives the same model on any TP/PP/VP.

Megatron-core draws each weight from the process's generator as it builds the layers, so the
values depend on the parallel layout: a pipeline stage starts the stream at its own first
layer, and TP vocabulary padding changes how many numbers the embedding consumes. Here every
parameter instead gets its own generator, seeded from ``(seed, global parameter name)``; the
full (unsharded) tensor is drawn on CPU and this rank keeps its slice. A run can therefore be
resharded, compared or restarted on another layout from the very first step.

Distributions follow Megatron's defaults: normal(0, std) for QKV, fc1, embedding and output
layer; normal(0, std / sqrt(2 * num_layers)) for the projections that write into the residual
stream (attention output, fc2); ones for RMSNorm weights. Padded vocabulary rows are zero.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch
from megatron.core import parallel_state as ps

from soda_mega.config.schema import SodaConfig
from soda_mega.parallel.sharding import local_slice, named_local_params
from soda_mega.tokens.layout import VocabLayout


def param_seed(seed: int, global_name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{global_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def full_shape(global_name: str, local_shape: torch.Size, cfg: SodaConfig,
               vocab_size: int | None = None) -> tuple[int, ...]:
    """Shape of the unsharded tensor (vocabulary matrices without padding rows);
    ``vocab_size``: the layout's size when the caller has it (else derived from ``cfg``)."""
    m = cfg.model
    h = m.hidden_size
    if global_name.endswith(("word_embeddings.weight", "output_layer.weight")):
        return (vocab_size or VocabLayout.from_config(cfg.vocab).size, h)
    if global_name.endswith("linear_qkv.weight"):
        return ((m.num_attention_heads + 2 * m.num_kv_heads) * m.head_dim, h)
    if global_name.endswith("linear_proj.weight"):
        return (h, m.num_attention_heads * m.head_dim)
    if global_name.endswith("linear_fc1.weight"):
        return (2 * m.ffn_hidden_size, h)
    if global_name.endswith("linear_fc2.weight"):
        return (h, m.ffn_hidden_size)
    if global_name.endswith("norm.weight"):
        return tuple(local_shape)
    raise KeyError(f"no initialisation rule for parameter {global_name!r}")


def init_full_tensor(global_name: str, shape: tuple[int, ...], cfg: SodaConfig) -> torch.Tensor:
    """The full fp32 value of one parameter, a pure function of (seed, name, config)."""
    if global_name.endswith("norm.weight"):
        return torch.ones(shape)
    std = cfg.model.init_std
    if global_name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = std / math.sqrt(2.0 * cfg.model.num_layers)
    gen = torch.Generator().manual_seed(param_seed(cfg.training.seed, global_name))
    return torch.empty(shape).normal_(0.0, std, generator=gen)


def _draw_threads() -> int:
    # Each parameter has its own generator, so the draws are independent: threads (torch's
    # normal_ releases the GIL and is single-threaded per call) give the same values faster.
    # soda-4b draws ~4.4e9 numbers: minutes on one core, seconds on a GPU host's CPUs.
    return max(1, min(16, os.cpu_count() or 1))


@torch.no_grad()
def initialize_weights(chunks, cfg: SodaConfig, vocab_size: int | None = None) -> None:
    """Fill every parameter of this rank's chunks with its slice of the layout-free init.

    The full tensors are drawn in a few threads at a time (at most ``2 x threads`` in flight,
    so host memory stays bounded) and copied in parameter order; the values do not depend on
    the number of threads."""
    tp_rank = ps.get_tensor_model_parallel_rank()
    tp_size = ps.get_tensor_model_parallel_world_size()
    vocab_size = vocab_size or VocabLayout.from_config(cfg.vocab).size
    params = list(named_local_params(chunks))
    threads = _draw_threads()

    def draw(item):
        gname, _, param = item
        return init_full_tensor(gname, full_shape(gname, param.shape, cfg, vocab_size), cfg)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque = deque()
        items = iter(params)
        for item in itertools.islice(items, 2 * threads):
            pending.append((item, pool.submit(draw, item)))
        while pending:
            (gname, _, param), future = pending.popleft()
            full = future.result()
            param.copy_(local_slice(gname, full, tp_rank, tp_size, param.shape).to(param.dtype))
            del full
            nxt = next(items, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(draw, nxt)))
