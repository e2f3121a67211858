"""Fault injection, summaries: what a run reports is computed from the modules it built, never from what a
checkpoint's ``progress.json`` says (an edited rank once gave "ratio achieved -1.7e6")."""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny_model, random_tokens

from lowrank.methods import SVDLLMConfig, SVDLLMV2Config, compress
from lowrank.nn import LowRankLinear

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {"svd-llm": SVDLLMConfig(ratio=0.25), "svd-llm-v2": SVDLLMV2Config(ratio=0.25)}
#: What an edited ``progress.json`` may claim for a module's rank.
EDITED_RANKS = [10**9, -5, 0, 1, None, "abc", 3.5]


def _from_modules(model, result) -> tuple[float, float]:
    """Both ratio conventions recomputed from the modules' actual shapes."""
    before = after = kept = full = 0
    for name, entry in result.modules.items():
        m, n = entry.shape
        module = model.get_submodule(name)
        before += m * n
        full += min(m, n)
        if isinstance(module, LowRankLinear):
            r = module.down.weight.shape[0]
            assert module.up.weight.shape[1] == r
            after, kept = after + r * (m + n), kept + r
        else:
            after, kept = after + m * n, kept + min(m, n)
    return 1 - after / before, kept / full


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("edited", EDITED_RANKS)
def test_an_edited_rank_in_progress_json_does_not_change_the_summary(tmp_path, method, edited):
    config, calibration, ckpt = CONFIGS[method], random_tokens(8, 32), tmp_path / "ckpt"
    reference = compress(make_tiny_model("llama"), config, calibration=calibration, checkpoint_dir=ckpt)
    edits = 0
    for path in ckpt.rglob("progress.json"):
        progress = json.loads(path.read_text())
        for record in progress["records"]:
            for entry in record.get("entries", {}).values():
                entry["rank"], edits = edited, edits + 1
        path.write_text(json.dumps(progress))
    assert edits == 14  # 7 linears in each of the 2 layers

    model = make_tiny_model("llama")
    result = compress(model, config, calibration=calibration, checkpoint_dir=ckpt)
    ratio, keep = _from_modules(model, result)
    assert 0 < ratio < 1
    assert result.details["ratio_params_removed"] == pytest.approx(ratio, abs=1e-6)
    assert result.details["keep_singular_fraction"] == pytest.approx(keep, abs=1e-6)
    assert result.ranks == reference.ranks
    assert result.details["ratio_params_removed"] == reference.details["ratio_params_removed"]
    for name, rank in result.ranks.items():
        module = model.get_submodule(name)
        assert rank == (module.down.weight.shape[0] if isinstance(module, LowRankLinear) else None)
