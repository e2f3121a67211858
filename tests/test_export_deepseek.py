"""Export to a stock DeepSeek-V3 checkpoint: loads in plain transformers (lowrank never imported), the same
logits and greedy tokens as lowrank's runtime (and as the original where the conversion is exact), a cache
of latent + rotary key, the latent norm made linear within its recorded bound, safe output directories."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from _decoding import logits
from _tiny import tiny_tokenizer
from conftest import make_tiny_model, random_tokens

from lowrank.cli import main
from lowrank.loading.export_deepseek import export_deepseek_v3
from lowrank.loading.serialization import save_compressed
from lowrank.methods import MLAConfig, compress

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = random_tokens(2, 24, seed=5)
CALIB = random_tokens(16, 48)

STOCK = """
import sys, torch
from transformers import AutoModelForCausalLM, DynamicCache
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    out = model(ids).logits
    gen = model.generate(ids[:1, :8], max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                         cache=DynamicCache(config=model.config))
layer = gen.cache.layers[0]
torch.save({"logits": out, "tokens": gen.sequences, "cache": [layer.keys.shape[-1], layer.values.shape[-1]],
            "heads": [layer.keys.shape[1], layer.values.shape[1]], "type": type(model).__name__,
            "lowrank_imported": "lowrank" in sys.modules}, sys.argv[3])
"""


def _stock(directory, tmp_path) -> dict:
    """Load ``directory`` in a fresh interpreter that never imports lowrank; its logits, tokens, cache."""
    torch.save(IDS, tmp_path / "ids.pt")
    run = subprocess.run(
        [sys.executable, "-c", STOCK, str(directory), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return torch.load(tmp_path / "out.pt")


@pytest.mark.parametrize(("kv_heads", "exact"), [(1, True), (2, False)])
def test_the_stock_model_reproduces_lowranks_runtime_and_the_original_when_exact(tmp_path, kv_heads, exact):
    model = make_tiny_model("llama", num_key_value_heads=kv_heads)
    original = logits(model, IDS)
    config = MLAConfig(rope_dim=16, kv_lora_rank=16) if exact else MLAConfig(rope_dim=4, kv_lora_rank=12)
    compress(model, config, calibration=CALIB)
    ours = logits(model, IDS)
    export_deepseek_v3(model, tmp_path / "ds", calibration=CALIB[:4])
    stock = _stock(tmp_path / "ds", tmp_path)
    assert stock["type"] == "DeepseekV3ForCausalLM" and not stock["lowrank_imported"]
    assert float((stock["logits"] - ours).abs().max()) <= 1e-4
    assert (float((stock["logits"] - original).abs().max()) <= 1e-3) == exact
    mine = model.generate(IDS[:1, :8], max_new_tokens=8, do_sample=False)
    assert torch.equal(stock["tokens"], mine)
    r, rope = (16, 16) if exact else (12, 4)
    assert stock["cache"] == [r, rope] and stock["heads"] == [1, 1]  # r + rope values per token and layer
    manifest = json.loads((tmp_path / "ds" / "lowrank.json").read_text())
    config_json = json.loads((tmp_path / "ds" / "config.json").read_text())
    assert config_json["model_type"] == "deepseek_v3" and config_json["q_lora_rank"] is None
    assert config_json["num_key_value_heads"] == config_json["num_attention_heads"] == 4
    assert config_json["first_k_dense_replace"] == 2 and config_json["rope_interleave"] is False
    for layer in manifest["latent_norm"]["layers"]:
        assert layer["calibration_ratio"] <= layer["bound_ratio"] <= 1e-6 * 1.0001


def test_interleaved_rotary_rows_and_a_padded_latent_are_the_same_model(tmp_path):
    """The engine-shaped export (vLLM's CPU kernel: interleaved pairs, a latent padded to its fixed width)
    gives the stock model the same logits and tokens, with exactly the padded width cached; untied, a tied
    source writes its own lm_head."""
    model = make_tiny_model("llama", num_key_value_heads=2, tie_word_embeddings=True)
    compress(model, MLAConfig(rope_dim=4, kv_lora_rank=12), calibration=CALIB)
    export_deepseek_v3(model, tmp_path / "ds", rope_interleave=True, kv_lora_rank=20, untie_embeddings=True)
    stock = _stock(tmp_path / "ds", tmp_path)
    assert float((stock["logits"] - logits(model, IDS)).abs().max()) <= 1e-4
    assert torch.equal(stock["tokens"], model.generate(IDS[:1, :8], max_new_tokens=8, do_sample=False))
    assert stock["cache"] == [20, 4]
    config_json = json.loads((tmp_path / "ds" / "config.json").read_text())
    assert config_json["rope_interleave"] is True and config_json["kv_lora_rank"] == 20
    assert config_json["tie_word_embeddings"] is False
    manifest = json.loads((tmp_path / "ds" / "lowrank.json").read_text())
    assert manifest["latent"] == {"converted": 12, "written": 20, "zero_padding": 8}
    with pytest.raises(ValueError, match="kv_lora_rank 8 is below the converted latent's 12"):
        export_deepseek_v3(model, tmp_path / "cut", kv_lora_rank=8)
    assert not (tmp_path / "cut").exists()


def test_a_ladder_of_the_fastest_frequencies_exports_with_its_own_base(tmp_path):
    """rope_stride 1 (the fastest frequencies, a rotary width that does not divide head_dim): the stock
    model turns its rotary key at the same angles through the base export writes, so the logits and tokens
    are lowrank's."""
    model = make_tiny_model("llama", num_key_value_heads=2)
    theta = float(model.config.rope_parameters["rope_theta"])
    compress(model, MLAConfig(rope_dim=6, rope_stride=1, kv_lora_rank=12), calibration=CALIB)
    export_deepseek_v3(model, tmp_path / "ds")
    stock = _stock(tmp_path / "ds", tmp_path)
    assert float((stock["logits"] - logits(model, IDS)).abs().max()) <= 1e-4
    assert torch.equal(stock["tokens"], model.generate(IDS[:1, :8], max_new_tokens=8, do_sample=False))
    config_json = json.loads((tmp_path / "ds" / "config.json").read_text())
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert config_json["rope_parameters"]["rope_theta"] == pytest.approx(theta ** (6 / head_dim), rel=1e-12)


def test_without_the_linear_norm_trick_the_stock_model_would_differ(tmp_path):
    """The δ scaling is what keeps the export exact: with a ratio near 1 the norm's nonlinearity shows."""
    model = make_tiny_model("llama", num_key_value_heads=1)
    compress(model, MLAConfig(rope_dim=16, kv_lora_rank=16), calibration=CALIB)
    export_deepseek_v3(model, tmp_path / "ds", ratio=5e-3)
    stock = _stock(tmp_path / "ds", tmp_path)
    assert float((stock["logits"] - logits(model, IDS)).abs().max()) > 1e-4


def test_refusals_are_one_line_and_write_nothing(tmp_path):
    model = make_tiny_model("llama")
    compress(model, MLAConfig(partial_rope="mha2mla", rope_dim=4, kv_rank=8), calibration=CALIB)
    with pytest.raises(
        ValueError, match="export needs every layer converted by mla with partial_rope='rorope'"
    ):
        export_deepseek_v3(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    gemma = make_tiny_model("gemma2")
    compress(gemma, MLAConfig(rope_dim=4, kv_lora_rank=12), calibration=CALIB)
    with pytest.raises(ValueError, match="model_type 'gemma2' has no stock DeepSeek-V3 equivalent") as info:
        export_deepseek_v3(gemma, tmp_path / "a")
    assert "\n" not in str(info.value)
    good = make_tiny_model("llama")
    compress(good, MLAConfig(rope_dim=4, kv_lora_rank=12), calibration=CALIB)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not written by lowrank"):
        export_deepseek_v3(good, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    export_deepseek_v3(good, tmp_path / "b")
    export_deepseek_v3(good, tmp_path / "b")  # its own earlier output is replaced


def test_the_cli_exports_a_saved_conversion(tmp_path, capsys):
    model = make_tiny_model("llama")
    compress(model, MLAConfig(rope_dim=4, kv_lora_rank=12), calibration=CALIB)
    save_compressed(model, tmp_path / "m", tokenizer=tiny_tokenizer())
    rc = main(
        [
            "export",
            str(tmp_path / "m"),
            "--format",
            "deepseek-v3",
            "--out",
            str(tmp_path / "ds"),
            "--check-tokens",
            "0",
        ]
    )
    assert rc == 0 and (tmp_path / "ds" / "config.json").is_file()
    assert float((_stock(tmp_path / "ds", tmp_path)["logits"] - logits(model, IDS)).abs().max()) <= 1e-4


def test_the_vllm_layout_is_the_same_model_at_the_same_latent_norm_eps(tmp_path):
    """``--engine vllm`` (interleaved pairs, untied lm_head, RoPE written as YaRN of factor 1, the latent
    norm's ε = rms_norm_eps): with transformers' ε given instead, stock transformers computes lowrank's
    logits and tokens, so the YaRN form is the same rotation; with vLLM's ε it does not (transformers builds
    that norm with 1e-6), which is why each engine gets its own export."""
    from lowrank.cli.export import ENGINES as CLI_ENGINES
    from lowrank.loading.export_deepseek import ENGINES, LATENT_NORM_EPS

    assert CLI_ENGINES == ENGINES
    model = make_tiny_model("llama", num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5)
    compress(model, MLAConfig(rope_dim=4, kv_lora_rank=12), calibration=CALIB)
    save_compressed(model, tmp_path / "m", tokenizer=tiny_tokenizer())
    common = [
        "export",
        str(tmp_path / "m"),
        "--format",
        "deepseek-v3",
        "--engine",
        "vllm",
        "--check-tokens",
        "0",
    ]
    assert main([*common, "--out", str(tmp_path / "ds"), "--latent-norm-eps", str(LATENT_NORM_EPS)]) == 0
    stock = _stock(tmp_path / "ds", tmp_path)
    assert float((stock["logits"] - logits(model, IDS)).abs().max()) <= 1e-4
    assert torch.equal(stock["tokens"], model.generate(IDS[:1, :8], max_new_tokens=8, do_sample=False))
    config_json = json.loads((tmp_path / "ds" / "config.json").read_text())
    rope = config_json["rope_parameters"]
    assert rope["rope_type"] == "yarn" and rope["factor"] == 1.0
    assert rope["original_max_position_embeddings"] == model.config.max_position_embeddings
    assert config_json["rope_interleave"] is True and config_json["tie_word_embeddings"] is False
    manifest = json.loads((tmp_path / "ds" / "lowrank.json").read_text())
    assert manifest["engine"] == "vllm" and manifest["latent_norm"]["epsilon_assumed"] == LATENT_NORM_EPS

    assert main([*common, "--out", str(tmp_path / "vllm")]) == 0
    manifest = json.loads((tmp_path / "vllm" / "lowrank.json").read_text())
    assert manifest["latent_norm"]["epsilon_assumed"] == pytest.approx(model.config.rms_norm_eps)
    assert float((_stock(tmp_path / "vllm", tmp_path)["logits"] - logits(model, IDS)).abs().max()) > 1e-2
    with pytest.raises(ValueError, match="engine must be one of transformers, vllm; got 'sglang'"):
        export_deepseek_v3(model, tmp_path / "bad", engine="sglang")
    assert not (tmp_path / "bad").exists()
