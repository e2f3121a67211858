"""Compression methods: one config class + one registered handler each, one verb (:func:`compress`).

>>> from lowrank.methods import compress, SVDLLMV2Config
>>> result = compress(model, SVDLLMV2Config(ratio=0.2, decomposer="rsvd"), calibration=token_ids)
"""

from lowrank.methods.base import (
    CompressionResult,
    MethodConfig,
    compress,
    config_from_dict,
    count_parameters,
    method_names,
    register_method,
)
from lowrank.methods.common import CalibratedConfig, LowRankConfig
from lowrank.methods.svd import SVDConfig
from lowrank.methods.svd_llm import CalibrationStatistics, SVDLLMConfig, collect_gram_statistics
from lowrank.methods.svd_llm_v2 import SVDLLMV2Config

__all__ = [
    "compress",
    "CompressionResult",
    "MethodConfig",
    "LowRankConfig",
    "CalibratedConfig",
    "SVDConfig",
    "SVDLLMConfig",
    "SVDLLMV2Config",
    "CalibrationStatistics",
    "collect_gram_statistics",
    "config_from_dict",
    "method_names",
    "register_method",
    "count_parameters",
]
