"""Evaluation of soda-mega checkpoints (SODA_SPEC section 5): held-out NLL, likelihood pairs,
ASR and TTS."""
