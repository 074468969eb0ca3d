"""HuggingFace interchange: export a soda-mega checkpoint as a ``Qwen3ForCausalLM`` folder
(weights, config, tokenizer with the whole SODA vocabulary) and import such a folder back as a
weights-only soda-mega checkpoint.

* :mod:`.export`: checkpoint (any TP / PP layout) -> HF folder (``soda-mega export hf``).
* :mod:`.importer`: HF folder -> checkpoint + training config (``soda-mega import hf``).
* :mod:`.tokenizer_files`: the tokenizer files, audio token names, layout read-back.
* :mod:`.hf_config`: ``config.json`` both ways; :mod:`.safetensors_io`: (sharded) weights.
* :mod:`.files`: atomic output folders, sizes, hashes, :class:`HFError`.
"""

from soda_mega.hf.files import HFError

__all__ = ["HFError"]
