"""A checkpoint's tensors against the model its configuration describes, before any model is built.

Evaluation, generation and ``export hf`` build a model from the configuration that a
checkpoint's ``trainer_state.json`` records, then load the tensors into it. That file is a few
KB and may come from elsewhere: a folder holding nothing else, with ``hidden_size: 8192``,
would make soda-mega allocate tens of GB before finding that there are no weights. So first,
from the ``.metadata`` of ``torch.distributed.checkpoint`` (read without running code,
:func:`soda_mega.checkpoint.trust.read_dcp_metadata`) and the sizes of the data files:

- the model's tensors hold exactly the parameters the configuration describes (counted by
  :mod:`soda_mega.model.accounting`, nothing built): the input embedding and output layer are
  ``[V_pad, hidden_size]``, the vocabulary's ``V`` ids padded for some TP size, everything
  else adds up to the non-embedding parameter count;
- every model tensor is stored in full (its entries hold at least its bytes), and every data
  file is as long as the entries placed in it.

The model built afterwards is then no larger than the files on disk.
"""

from __future__ import annotations

from pathlib import Path

from soda_mega.checkpoint.errors import CheckpointError, DamagedCheckpoint
from soda_mega.checkpoint.manifest import data_file_problems
from soda_mega.checkpoint.trust import DCP_METADATA, read_dcp_metadata
from soda_mega.config.schema import MAX_HEADS, SodaConfig

#: First name components of the model's tensors (the optimizer's are under ``optimizer.``).
MODEL_PREFIXES = ("embedding", "decoder", "output_layer")
VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _shape_fields(cfg: SodaConfig) -> str:
    m = cfg.model
    return (f"model.hidden_size={m.hidden_size}, model.num_layers={m.num_layers}, "
            f"model.num_attention_heads={m.num_attention_heads}, model.num_kv_heads="
            f"{m.num_kv_heads}, model.head_dim={m.head_dim}, model.ffn_hidden_size="
            f"{m.ffn_hidden_size}")


def check_model_tensors(step_dir: Path, cfg: SodaConfig, source: str) -> None:
    """Refuse ``step_dir`` unless its tensors are those of ``cfg``'s model, stored in full
    (see the module docstring). ``source`` names where ``cfg`` came from (its state file)."""
    step_dir = Path(step_dir)
    shown = step_dir / DCP_METADATA
    if not shown.exists():
        raise DamagedCheckpoint(f"{shown}: missing; the checkpoint holds no weights for the model "
                                f"{source} describes (it is incomplete)")
    metadata = read_dcp_metadata(step_dir)
    try:
        _check(step_dir, metadata, cfg, source)
    except CheckpointError:
        raise
    except (AttributeError, TypeError, ValueError, OverflowError, RuntimeError) as err:
        # NOTE: the metadata classes are admitted, not their field values, which a forged
        # .metadata may set to anything (a string for a length, a key that is not a name).
        raise DamagedCheckpoint(f"{shown}: damaged ({type(err).__name__}: "
                                f"{str(err).strip()[:200]})") from None


def _check(step_dir: Path, metadata, cfg: SodaConfig, source: str) -> None:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from soda_mega.model.accounting import non_embedding_parameters

    shown = step_dir / DCP_METADATA
    tensors = {fqn: md for fqn, md in metadata.state_dict_metadata.items()
               if isinstance(md, TensorStorageMetadata) and fqn.split(".")[0] in MODEL_PREFIXES}
    h, vocab = cfg.model.hidden_size, cfg.vocab.size
    # NOTE: padded to a multiple of make_vocab_size_divisible_by x TP (any TP the heads allow)
    most_rows = vocab + cfg.model.make_vocab_size_divisible_by * MAX_HEADS
    non_embedding = non_embedding_parameters(cfg.model)

    def refuse(detail: str) -> CheckpointError:
        return CheckpointError(f"{shown}: the tensors are not those of the model {source} "
                               f"describes: {detail}; the checkpoint is damaged or was altered")

    for name in VOCAB_TENSORS:
        if name not in tensors:
            raise refuse(f"there is no {name}")
        shape = tuple(tensors[name].size)
        if len(shape) != 2 or shape[1] != h or not vocab <= shape[0] < most_rows:
            raise refuse(f"{name} is {list(shape)}, model.hidden_size={h} and the vocabulary "
                         f"({vocab} ids) need [{vocab} or a few more, {h}]")
    others = sum(md.size.numel() for fqn, md in tensors.items() if fqn not in VOCAB_TENSORS)
    if others != non_embedding:
        raise refuse(f"they hold {others:,} parameters besides the vocabulary tensors, "
                     f"{_shape_fields(cfg)} need {non_embedding:,}")
    _check_stored(step_dir, metadata, tensors, refuse)


def _check_stored(step_dir: Path, metadata, tensors: dict, refuse) -> None:
    """Each tensor's entries hold at least its bytes, and the files hold the entries."""
    stored: dict[str, int] = {}
    for index, info in (metadata.storage_data or {}).items():
        stored[index.fqn] = stored.get(index.fqn, 0) + info.length
    for fqn, md in tensors.items():
        need = md.size.numel() * md.properties.dtype.itemsize
        if stored.get(fqn, 0) < need:
            raise refuse(f"{fqn} ({list(md.size)}, {md.properties.dtype}) needs {need:,} bytes, its "
                         f"entries hold {stored.get(fqn, 0):,}")
    problems = data_file_problems(step_dir, metadata)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DamagedCheckpoint(f"checkpoint {step_dir} is damaged: {problems[0]}{more}")
