"""Compression methods: one config class + one registered handler each, one verb (:func:`compress`).

>>> from lowrank.methods import compress, SVDLLMV2Config
>>> result = compress(model, SVDLLMV2Config(ratio=0.2, decomposer="rsvd"), calibration=token_ids)
"""

from lowrank.calibration.pipeline import CalibrationConfig, CalibrationStatistics, RunContext
from lowrank.methods.base import (
    CompressionResult,
    MethodConfig,
    applied_methods,
    compress,
    config_class,
    config_from_dict,
    count_parameters,
    method_names,
    register_method,
    weight_bytes,
)
from lowrank.methods.common import LowRankConfig, WhitenedConfig
from lowrank.methods.heal import HealConfig
from lowrank.methods.kv_projection import KVProjectionConfig
from lowrank.methods.mla import MLAConfig
from lowrank.methods.quantize import QuantizeConfig
from lowrank.methods.records import ModuleKind, ModuleRecord
from lowrank.methods.svd import SVDConfig
from lowrank.methods.svd_llm import SVDLLMConfig, collect_gram_statistics
from lowrank.methods.svd_llm_v2 import SVDLLMV2Config

__all__ = [
    "compress",
    "CompressionResult",
    "ModuleKind",
    "ModuleRecord",
    "MethodConfig",
    "LowRankConfig",
    "WhitenedConfig",
    "CalibrationConfig",
    "CalibrationStatistics",
    "RunContext",
    "SVDConfig",
    "SVDLLMConfig",
    "SVDLLMV2Config",
    "KVProjectionConfig",
    "MLAConfig",
    "HealConfig",
    "QuantizeConfig",
    "collect_gram_statistics",
    "config_from_dict",
    "config_class",
    "method_names",
    "register_method",
    "count_parameters",
    "weight_bytes",
    "applied_methods",
]
