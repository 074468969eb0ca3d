"""Token layout of the interleaved audio-text stream."""

from soda_mega.tokens.layout import LOSS_GROUPS, Modality, VocabLayout, modality_names

__all__ = ["LOSS_GROUPS", "Modality", "VocabLayout", "modality_names"]
