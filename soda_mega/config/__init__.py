"""Typed run configuration: sections, presets, file loading and overrides."""

from soda_mega.config.fields import ConfigError
from soda_mega.config.loader import dump_config, load_config, load_preset, preset_names
from soda_mega.config.schema import (
    DataConfig,
    KernelsConfig,
    ModelConfig,
    ParallelConfig,
    SodaConfig,
    TrainingConfig,
    VocabConfig,
)

__all__ = [
    "ConfigError", "DataConfig", "KernelsConfig", "ModelConfig", "ParallelConfig", "SodaConfig",
    "TrainingConfig", "VocabConfig", "dump_config", "load_config", "load_preset", "preset_names",
]
