"""Fault injection, manifests against tensors and configs against weights: every edited field of a saved
model's lowrank.json, and every edited size of a plain model's config.json, is a one-line error at load
time or changes nothing; never a crash at the first forward pass, never silently other (or random)
weights."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import save_tiny_model_dir
from conftest import make_tiny_model, random_tokens

from lowrank.cli import main
from lowrank.loading.models import load_model
from lowrank.loading.serialization import load_compressed, save_compressed
from lowrank.methods import QuantizeConfig, compress, config_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")

pytest.importorskip("hqq")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A low-rank then quantized tiny model, saved; and its logits."""
    model = make_tiny_model("llama")
    compress(model, config_from_dict({"method": "svd", "ratio": 0.3}))
    compress(model, QuantizeConfig(bits=4, group_size=16))
    out = save_compressed(model, tmp_path_factory.mktemp("q") / "q")
    ids = random_tokens(1, 16)
    with torch.no_grad():
        return out, ids, model(ids).logits


def _edits(manifest):
    """(description, edit) for every numeric or dtype field of the first recorded module of each class."""
    firsts = {}
    for name, desc in manifest["modules"].items():
        firsts.setdefault(desc["class"], (name, desc))
    for name, desc in firsts.values():
        for key, value in desc["spec"].items():
            if isinstance(value, int) and not isinstance(value, bool):
                for new in {value + 8, value * 2, max(value // 2, 1)} - {value}:
                    yield f"{name}.{key}={new}", (name, (key,), new)
            if key == "stored":
                for tensor, entry in value.items():
                    for dtype in ("float32", "float16", "uint8", "int32"):
                        if dtype != entry["dtype"]:
                            yield f"{name}.{tensor}.dtype={dtype}", (name, ("stored", tensor, "dtype"), dtype)


def _apply(manifest, edit):
    name, path, new = edit
    target = manifest["modules"][name]["spec"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new


def test_every_edited_manifest_field_is_refused_or_harmless(saved, tmp_path):
    out, ids, expected = saved
    original = json.loads((out / "lowrank.json").read_text())
    edits = list(_edits(original))
    assert len(edits) > 20  # bits, group_size, features, ranks and dtypes of every module class
    refused = 0
    for label, edit in edits:
        manifest = json.loads(json.dumps(original))
        _apply(manifest, edit)
        (out / "lowrank.json").write_text(json.dumps(manifest))
        try:
            model, _ = load_compressed(out, verify=False)
        except ValueError as exc:
            assert "\n" not in str(exc), label
            refused += 1
            continue
        with torch.no_grad():
            assert torch.equal(model(ids).logits, expected), f"{label} loaded silently with other logits"
    (out / "lowrank.json").write_text(json.dumps(original))
    assert refused > len(edits) // 2, refused  # most edits matter: the check is not vacuous


@pytest.mark.parametrize(("key", "claim"), [("bits", 8), ("bits", 2), ("group_size", 32), ("group_size", 8)])
def test_quantized_settings_that_disagree_with_the_tensors_are_named(saved, key, claim):
    out, _, _ = saved
    original = (out / "lowrank.json").read_text()
    manifest = json.loads(original)
    name = next(n for n, d in manifest["modules"].items() if d["class"] == "QuantizedLinear")
    manifest["modules"][name]["spec"][key] = claim
    try:
        (out / "lowrank.json").write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match=rf"{name}.*{key}={claim}.*do not match") as info:
            load_compressed(out)
        assert "\n" not in str(info.value)
    finally:
        (out / "lowrank.json").write_text(original)


_CONFIG_EDITS = [
    ("num_hidden_layers", 3),
    ("num_hidden_layers", 1),
    ("intermediate_size", 128),
    ("intermediate_size", 192),
    ("hidden_size", 32),
    ("num_key_value_heads", 4),
    ("vocab_size", 300),
]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain") / "m"
    save_tiny_model_dir(path)
    return path


@pytest.mark.parametrize(("key", "value"), _CONFIG_EDITS)
def test_a_config_that_disagrees_with_its_weights_is_one_line_naming_a_tensor(plain, key, value):
    original = (plain / "config.json").read_text()
    config = json.loads(original)
    config[key] = value
    try:
        (plain / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=r"tensor '[\w.]+'") as info:
            load_model(str(plain))
        assert "\n" not in str(info.value)
    finally:
        (plain / "config.json").write_text(original)


def test_evaluate_refuses_missing_layers_instead_of_random_weights(plain, capsys):
    original = (plain / "config.json").read_text()
    config = json.loads(original)
    config["num_hidden_layers"] = 3
    try:
        (plain / "config.json").write_text(json.dumps(config))
        rc = main(["evaluate", "--model", str(plain), "--no-throughput", "--device", "cpu"])
    finally:
        (plain / "config.json").write_text(original)
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model.layers.2." in err and "missing" in err
