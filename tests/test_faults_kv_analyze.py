"""Fault injection, kv-analyze: it refuses in one line, before any compute, every model that ``compress
--method kv-projection`` refuses (a quantized model once gave an ``AttributeError`` traceback; an MLA or
kv-projection model got recommendations that ``compress`` then refused)."""

from __future__ import annotations

import pytest
from _tiny import tiny_text, tiny_tokenizer
from conftest import make_tiny_model, random_tokens

import lowrank.methods.kv_analysis as kv_analysis
from lowrank.cli import main
from lowrank.loading.serialization import save_compressed
from lowrank.methods import KVProjectionConfig, QuantizeConfig, compress, method_names
from lowrank.methods.base import refusal, set_applied_methods

pytestmark = pytest.mark.usefixtures("one_thread")


class Computed(Exception):
    """Raised in place of the first Gram collection: the analysis got past its checks."""


@pytest.fixture
def no_compute(monkeypatch):
    def refuse(*args, **kwargs):
        raise Computed

    monkeypatch.setattr(kv_analysis, "collect_attention_grams", refuse)


@pytest.mark.parametrize("earlier", method_names())
def test_kv_analyze_refuses_exactly_what_kv_projection_refuses(no_compute, earlier):
    model = make_tiny_model("llama")
    set_applied_methods(model, [{"method": earlier}], [])
    ids = random_tokens(2, 16)
    refused = earlier not in KVProjectionConfig.follows
    assert (refusal(KVProjectionConfig, model) is not None) == refused
    if not refused:
        with pytest.raises(Computed):
            kv_analysis.analyze_kv(model, ids, ids, rank_fraction=0.5)
        return
    with pytest.raises(ValueError) as by_compress:
        compress(model, KVProjectionConfig(rank_fraction=0.5), calibration=ids)
    with pytest.raises(ValueError) as by_analysis:
        kv_analysis.analyze_kv(model, ids, ids, rank_fraction=0.5)
    message = str(by_analysis.value)
    assert "\n" not in message and str(by_compress.value) in message and repr(earlier) in message


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A tiny model quantized for real and saved, and a text file for its analysis."""
    path = tmp_path_factory.mktemp("kvq")
    model = make_tiny_model("llama")
    compress(model, QuantizeConfig(bits=4, group_size=16))
    save_compressed(model, path / "q4", tokenizer=tiny_tokenizer())
    (path / "text.txt").write_text(tiny_text(2000))
    return path


def test_cli_on_a_quantized_model_is_one_line_before_reading_data(quantized, capsys, monkeypatch):
    import lowrank.io.data

    def unread(*args, **kwargs):
        raise AssertionError("data read before the model was checked")

    monkeypatch.setattr(lowrank.io.data, "load_text", unread)
    argv = ["kv-analyze", "--model", str(quantized / "q4"), "--data", str(quantized / "text.txt")]
    rc = main([*argv, "--calib-samples", "2", "--heldout-samples", "1", "--calib-seq-len", "16"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("lowrank kv-analyze: error:") and "\n" not in err
    assert "'quantize'" in err and "kv-projection" in err and str(quantized / "q4") in err
    assert "Traceback" not in err and "AttributeError" not in err


def test_a_quantized_model_without_a_history_is_refused_too(no_compute):
    """The record of applied methods is not the only evidence: quantized modules themselves refuse."""
    model = make_tiny_model("llama")
    compress(model, QuantizeConfig(bits=4, group_size=16))
    set_applied_methods(model, [], [])
    ids = random_tokens(2, 16)
    with pytest.raises(ValueError, match="kv-projection") as info:
        kv_analysis.analyze_kv(model, ids, ids, rank_fraction=0.5)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method", ["mla", "kv-projection"])
def test_attention_methods_refuse_quantized_attention_before_work(method):
    from lowrank.methods import config_class

    model = make_tiny_model("llama")
    compress(model, QuantizeConfig(bits=4, group_size=16))
    set_applied_methods(model, [], [])  # only the modules tell
    cls = config_class(method)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj is a QuantizedLinear"):
        compress(model, cls.from_dict(dict(cls.example)), calibration=random_tokens(2, 16))
