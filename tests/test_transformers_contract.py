"""lowrank uses transformers through its public surface only.

Two rules keep a transformers release from breaking compressed models (as 5.25's kernel decorators broke
a borrowed attention ``forward``):

* no transformers method runs on an object that is not an instance of the method's class (checked at run
  time, on every call transformers' code receives while compressed models run, decode and generate);
* lowrank reads no private attribute of another library's objects (checked on the package and the
  benchmarks: every ``obj._name`` whose ``_name`` lowrank does not define itself must be listed below,
  with its reason).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch
from conftest import ARCHITECTURES, make_tiny_model, random_tokens

from lowrank.attention.cache import make_cache
from lowrank.methods import compress, config_class

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (ROOT / "src" / "lowrank", ROOT / "benchmarks")

#: Private names of other libraries that lowrank may touch: (file relative to the repository, name) → reason.
ALLOWED = {
    ("src/lowrank/nn/attention_layout.py", "_attn_implementation"): "transformers has no public getter or "
    "per-module setter for the attention kernel; its own modules and docs use this property (one accessor, "
    "one router)",
    ("src/lowrank/cli/compress.py", "_actions"): "argparse (standard library): the registered actions",
}
ALLOWED_ANYWHERE = {"_SubParsersAction"}  # argparse's type, in annotations of subcommand registrars


def _own_names(trees: dict[str, ast.AST]) -> set[str]:
    """Names lowrank defines: functions, classes, variables, arguments, and attributes set on self/cls."""
    own: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                own.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.arg):
                own.add(node.arg)
            elif isinstance(node, ast.alias):
                own.add(node.asname or node.name.split(".")[0])
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    own.add(node.attr)
            elif (
                _string_attribute(node)
                and isinstance(node.args[0], ast.Name)
                and node.args[0].id in ("self", "cls")
            ):
                own.add(node.args[1].value)
    return own


def _string_attribute(node: ast.AST) -> bool:
    """``getattr/setattr/hasattr/object.__setattr__(obj, "_name", …)`` with a private literal name."""
    if not isinstance(node, ast.Call) or len(node.args) < 2:
        return False
    func = node.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    arg = node.args[1]
    return (
        name in ("getattr", "setattr", "hasattr", "__setattr__", "__getattribute__")
        and isinstance(arg, ast.Constant)
        and isinstance(arg.value, str)
        and arg.value.startswith("_")
        and not arg.value.startswith("__")
    )


def _private_accesses(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            yield node.lineno, node.attr
        elif _string_attribute(node):
            yield node.lineno, node.args[1].value


def test_no_private_attribute_of_another_library_is_touched():
    paths = [path for source in SOURCES for path in source.rglob("*.py")]
    trees = {path.relative_to(ROOT).as_posix(): ast.parse(path.read_text(), str(path)) for path in paths}
    own = _own_names(trees)
    foreign = [
        f"{path}:{line} {name}"
        for path, tree in trees.items()
        for line, name in _private_accesses(tree)
        if name not in own and name not in ALLOWED_ANYWHERE and (path, name) not in ALLOWED
    ]
    assert not foreign, "private attributes of other libraries: " + ", ".join(foreign)


def test_the_private_name_check_sees_a_foreign_private_read():
    tree = ast.parse("def f(config):\n    return config._attn_implementation\n")
    own = _own_names({"x.py": tree})
    assert [name for _, name in _private_accesses(tree) if name not in own] == ["_attn_implementation"]
    tree = ast.parse("class A:\n    def f(self):\n        self._x = 1\n        return self._x\n")
    own = _own_names({"x.py": tree})
    assert [name for _, name in _private_accesses(tree) if name not in own] == []


class _ForeignMethodCalls:
    """A profiler that records transformers methods entered with a ``self`` of an unrelated class."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, frame, event, arg) -> None:
        if event != "call" or "transformers" not in frame.f_code.co_filename:
            return
        names = frame.f_code.co_varnames[: frame.f_code.co_argcount]
        qualname = frame.f_code.co_qualname
        if not names or names[0] != "self" or "." not in qualname or "<locals>" in qualname:
            return
        owner = qualname.rsplit(".", 1)[0]
        instance = frame.f_locals.get("self")
        if instance is not None and owner not in {c.__qualname__ for c in type(instance).__mro__}:
            self.seen.add(f"{qualname} on {type(instance).__name__}")

    def __enter__(self):
        sys.setprofile(self)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(None)


def _run(model, ids):
    with torch.no_grad():
        model(ids)
        cache = make_cache(model)
        model(input_ids=ids[:, :8], use_cache=True, **{_cache_keyword(model): cache})
        model(input_ids=ids[:, 8:9], use_cache=True, **{_cache_keyword(model): cache})
        model.generate(ids[:, :8], max_new_tokens=3, do_sample=False)


def _cache_keyword(model) -> str:
    from lowrank.attention.cache import cache_argument

    return cache_argument(model)


def test_the_profiler_catches_a_method_borrowed_by_another_class():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class Borrower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(4))
            self.variance_epsilon = 1e-6

    with _ForeignMethodCalls() as calls:
        LlamaRMSNorm.forward(Borrower(), torch.ones(1, 4))
    assert calls.seen == {"LlamaRMSNorm.forward on Borrower"}


@pytest.mark.parametrize("method", ["mla", "kv-projection"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_compressed_attention_calls_no_transformers_method_on_a_foreign_object(arch, method):
    cls = config_class(method)
    model = make_tiny_model(arch)
    if cls.unsupported(model):
        pytest.skip(cls.unsupported(model))
    compress(model, cls(**cls.example), calibration=random_tokens(8, 32))
    with _ForeignMethodCalls() as calls:
        _run(model, random_tokens(2, 12, seed=3))
    assert not calls.seen, "transformers methods called on foreign objects: " + ", ".join(sorted(calls.seen))


def test_an_attention_with_parts_the_forward_does_not_know_is_refused():
    from lowrank.attention.low_rank_kv import KVProjection
    from lowrank.attention.wrapper import ProjectedAttention

    model = make_tiny_model("llama")
    attention = model.model.layers[0].self_attn
    attention.sinks = torch.nn.Parameter(torch.zeros(4))  # e.g. attention sinks: a term this forward lacks
    codec = KVProjection(4, 2, 16, 8)
    with pytest.raises(ValueError, match="does not compute with: sinks"):
        ProjectedAttention(attention, codec)
