"""Architecture knowledge: the attention facts resolved for each family agree with its config and modules."""

from __future__ import annotations

import pytest
from conftest import make_tiny_model

from lowrank.nn.architectures import ArchSpec, decoder_layers, get_arch_spec, register_arch_spec
from lowrank.nn.attention_layout import attention_info, attention_shape

#: family -> (q/k norm layout, scale read from the config or None for head_dim**-0.5)
FAMILIES = {
    "llama": (None, None),
    "mistral": (None, None),
    "qwen2": (None, None),
    "qwen3": ("b t h d", None),
    "gemma": (None, None),
    "gemma2": (None, lambda c: c.query_pre_attn_scalar**-0.5),
    "gemma3_text": ("b h t d", lambda c: c.query_pre_attn_scalar**-0.5),
    "olmo": (None, None),
    "olmo2": ("b t (h d)", None),
    "granite": (None, lambda c: c.attention_multiplier),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_info_agrees_with_config_and_modules(family):
    model = make_tiny_model(family)
    cfg, info = model.config, attention_info(model)
    layout, scale = FAMILIES[family]
    assert (info.shape.num_heads, info.shape.num_kv_heads) == (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
    )
    assert (info.shape.head_dim, info.shape.group_size, info.shape.kind) == (cfg.head_dim, 2, "GQA")
    attn = decoder_layers(model)[0].get_submodule(info.attention)
    assert info.qk_norm_layout == layout and (info.q_norm is None) == (layout is None)
    if layout is not None:  # the norms exist where the spec says, with the size the layout implies
        per_head = layout != "b t (h d)"
        for path, heads in ((info.q_norm, cfg.num_attention_heads), (info.k_norm, cfg.num_key_value_heads)):
            assert attn.get_submodule(path).weight.numel() == cfg.head_dim * (1 if per_head else heads)
    for kind in ("q", "k", "v", "o"):
        assert info.bias[kind] == (getattr(attn, f"{kind}_proj").bias is not None)
    assert info.scaling == pytest.approx(scale(cfg) if scale else cfg.head_dim**-0.5)
    assert info.attn_logit_softcapping == getattr(cfg, "attn_logit_softcapping", None)
    assert info.final_logit_softcapping == getattr(cfg, "final_logit_softcapping", None)
    assert info.rotary == "model.rotary_emb" and model.get_submodule(info.rotary) is model.model.rotary_emb
    assert info.rotary_style == "rotate_half" and info.rotary_dim == cfg.head_dim
    layers = cfg.num_hidden_layers
    assert len(info.layer_types) == len(info.sliding_window) == len(info.rope) == layers
    assert all(info.rope)


def test_biases_geometry_and_scaling_of_specific_families():
    assert attention_info(make_tiny_model("qwen2")).bias == {"q": True, "k": True, "v": True, "o": False}
    assert attention_shape(make_tiny_model("llama", num_key_value_heads=4).config).kind == "MHA"
    assert attention_shape(make_tiny_model("llama", num_key_value_heads=1).config).kind == "MQA"
    gemma2 = attention_info(make_tiny_model("gemma2", query_pre_attn_scalar=64, attn_logit_softcapping=7.0))
    assert gemma2.scaling == 64**-0.5 and gemma2.attn_logit_softcapping == 7.0
    assert gemma2.final_logit_softcapping == 30.0


@pytest.mark.parametrize(
    ("family", "overrides", "windows"),
    [
        ("llama", {}, (None, None)),
        ("mistral", {"sliding_window": 8}, (8, 8)),  # one window for every layer
        ("gemma2", {"sliding_window": 8}, (8, None)),  # alternating, from layer_types
        ("qwen2", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}, (None, 6)),
        (
            "gemma3_text",
            {"sliding_window": 5, "layer_types": ["full_attention", "sliding_attention"]},
            (None, 5),
        ),
    ],
)
def test_sliding_windows_per_layer(family, overrides, windows):
    model = make_tiny_model(family, **overrides)
    info = attention_info(model)
    assert info.sliding_window == windows
    types = getattr(model.config, "layer_types", None)
    assert info.layer_types == (tuple(types) if types else ("full_attention",) * 2)


def test_layers_without_rope_are_reported():
    model = make_tiny_model("smollm3", num_hidden_layers=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    assert attention_info(model).rope == (True, True, True, False)  # NoPE every fourth layer


def test_missing_norm_and_wrong_layout_are_value_errors():
    model = make_tiny_model("qwen3")
    del decoder_layers(model)[0].self_attn.q_norm
    with pytest.raises(ValueError, match=r"self_attn\.q_norm"):
        get_arch_spec(model)
    model = make_tiny_model("olmo2")
    spec = get_arch_spec(model)
    try:
        register_arch_spec("olmo2", ArchSpec(q_norm="q_norm", k_norm="k_norm", qk_norm_layout="b t h d"))
        with pytest.raises(ValueError, match="qk_norm_layout 'b t h d' needs 16"):
            attention_info(model)
    finally:
        register_arch_spec("olmo2", spec)


def test_geometry_must_divide():
    config = make_tiny_model("llama").config
    config.num_key_value_heads = 3
    with pytest.raises(ValueError, match="num_attention_heads=4 is not a multiple of num_key_value_heads=3"):
        attention_shape(config)
