"""One matching grammar (suffix, re:, class name) and one module-swapping helper."""

from __future__ import annotations

import logging

import pytest
from torch import nn

from lowrank.nn.surgery import match_modules, replace_module


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(4, 4)
        self.mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(4, 2)


def test_suffix_regex_and_class_name():
    net = Net()
    assert list(match_modules(net, "q_proj")) == ["layers.0.q_proj", "layers.1.q_proj"]
    assert list(match_modules(net, "re:layers\\.1\\..*")) == ["layers.1.q_proj", "layers.1.mlp"]
    assert len(match_modules(net, "Linear")) == 7
    assert list(match_modules(net, "ReLU")) == ["layers.0.mlp.1", "layers.1.mlp.1"]
    # suffixes are whole dotted components: 'proj' is not a suffix of 'q_proj'
    with pytest.raises(ValueError, match="select no module"):
        match_modules(net, "proj")


def test_ignore_uses_the_same_grammar_and_unmatched_target_warns(caplog):
    net = Net()
    with caplog.at_level(logging.WARNING, logger="lowrank.nn.surgery"):
        got = match_modules(net, ["Linear", "k_proj"], ignore=["head", "re:.*mlp\\.0"])
    assert "head" not in got and "layers.0.mlp.0" not in got and "layers.0.mlp.2" in got
    assert "k_proj" in caplog.text
    with pytest.raises(ValueError, match="k_proj"):
        match_modules(net, ["Linear", "k_proj"], strict=True)


def test_nested_matches_are_not_repeated():
    got = match_modules(Net(), ["mlp", "Linear"])
    assert "layers.0.mlp" in got and "layers.0.mlp.0" not in got


def test_bad_regex_is_a_value_error():
    with pytest.raises(ValueError, match="invalid regular expression"):
        match_modules(Net(), "re:(")


def test_replace_module_attribute_and_list_entry():
    net = Net()
    new = nn.Identity()
    old = replace_module(net, "layers.1.q_proj", new)
    assert isinstance(old, nn.Linear) and net.layers[1].q_proj is new
    replace_module(net, "layers.0", nn.Identity())
    assert isinstance(net.layers[0], nn.Identity)
    replace_module(net, "layers.1.mlp.2", nn.Identity())
    assert isinstance(net.layers[1].mlp[2], nn.Identity)
    with pytest.raises(ValueError, match="no submodule"):
        replace_module(net, "layers.1.nothing", nn.Identity())
