"""Evaluation harness: perplexity protocol, non-finite detection, measured KV cache, throughput, report."""

from __future__ import annotations

import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ARCHITECTURES, make_tiny_model, random_tokens
from torch import nn

from lowrank.evaluation import (
    NonFiniteLogitsError,
    memory_report,
    paired_throughput,
    perplexity,
    tensor_bytes,
    throughput,
)
from lowrank.evaluation.report import evaluate_model, report_rows

# ----------------------------------------------------------------------------- perplexity


class ConstantLM(nn.Module):
    """Uniform next-token distribution; windows whose first token is ``poison`` give NaN logits."""

    def __init__(self, vocab: int = 50, poison: int | None = None):
        super().__init__()
        self.vocab, self.poison = vocab, poison
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, use_cache=False, **kw):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        if self.poison is not None:
            logits[input_ids[:, 0] == self.poison] = float("nan")
        return SimpleNamespace(logits=logits)


def test_uniform_model_has_perplexity_equal_to_vocab():
    ids = torch.randint(0, 50, (1000,), generator=torch.Generator().manual_seed(0))
    result = perplexity(ConstantLM(50), None, ids, seq_len=64, progress=False)
    assert result.windows == 1000 // 64
    assert result.tokens_evaluated == result.windows * 63
    assert result.perplexity == pytest.approx(50.0, rel=1e-6)
    assert result.nll == pytest.approx(math.log(50), rel=1e-6)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_matches_mean_of_per_window_hf_loss(arch):
    model = make_tiny_model(arch)
    ids = random_tokens(1, 4 * 32 + 7, seed=1)[0]  # the 7-token remainder is not evaluated
    result = perplexity(model, None, ids, seq_len=32, progress=False)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss for w in ids[: 4 * 32].view(4, 32)]
    expected = torch.stack(losses).mean().item()  # equal windows: mean of means = mean over all tokens
    assert result.windows == 4 and result.tokens_evaluated == 4 * 31
    assert result.nll == pytest.approx(expected, rel=1e-5)


def test_batch_size_and_max_windows():
    model = make_tiny_model("llama")
    ids = random_tokens(1, 10 * 16, seed=2)[0]
    one = perplexity(model, None, ids, seq_len=16, batch_size=1, progress=False)
    three = perplexity(model, None, ids, seq_len=16, batch_size=3, progress=False)
    assert three.windows == one.windows == 10
    assert three.nll == pytest.approx(one.nll, rel=1e-5)
    first4 = perplexity(model, None, ids, seq_len=16, max_windows=4, progress=False)
    head = perplexity(model, None, ids[: 4 * 16], seq_len=16, progress=False)
    assert first4.windows == 4 and first4.nll == pytest.approx(head.nll, rel=1e-6)


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_non_finite_logits_name_the_window(batch_size):
    ids = torch.ones(8 * 10, dtype=torch.long)
    ids[5 * 10] = 7  # window 5 starts with the poison token
    with pytest.raises(NonFiniteLogitsError, match=r"window 5 \(tokens 50\.\.59\)"):
        perplexity(ConstantLM(50, poison=7), None, ids, seq_len=10, batch_size=batch_size, progress=False)


def test_bad_arguments():
    model = ConstantLM()
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, None, torch.arange(10), seq_len=16, progress=False)
    with pytest.raises(ValueError, match="seq_len=1"):
        perplexity(model, None, torch.arange(10), seq_len=1, progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity(model, None, "raw text needs a tokenizer", seq_len=4, progress=False)


def test_text_and_ids_give_the_same_result():
    from _tiny import tiny_text, tiny_tokenizer

    tok, text = tiny_tokenizer(), tiny_text(200, seed=3)
    model = make_tiny_model("llama")
    a = perplexity(model, tok, text, seq_len=50, progress=False)
    b = perplexity(model, None, torch.tensor(tok(text)["input_ids"]), seq_len=50, progress=False)
    assert a == b


# ----------------------------------------------------------------------------- BOS per window

BOS = 255


def bos_tokenizer(adds_bos: bool = True):
    """A word-level tokenizer like the tiny one ('w0' … 'w253' -> 1…254) whose BOS '<s>' is id 255; with
    ``adds_bos`` it prepends it by default (as Gemma's and Llama's do), else it only declares it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]"] + [f"w{i}" for i in range(254)] + ["<s>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>")


class RecordingLM(ConstantLM):
    """:class:`ConstantLM` that keeps every batch it is given."""

    def __init__(self, vocab: int = 256):
        super().__init__(vocab)
        self.batches = []

    def forward(self, input_ids, use_cache=False, **kw):
        self.batches.append(input_ids.clone())
        return super().forward(input_ids, use_cache=use_cache, **kw)


def test_bos_windows_predict_every_text_token_once():
    ids = torch.randint(1, 255, (10 * 15 + 4,), generator=torch.Generator().manual_seed(0))
    model = RecordingLM()
    result = perplexity(model, bos_tokenizer(), ids, seq_len=16, batch_size=3, progress=False)
    windows = torch.cat(model.batches)
    assert result.bos and result.windows == 10 and result.seq_len == 16
    assert windows.shape == (10, 16) and bool((windows[:, 0] == BOS).all())
    # targets are the text tokens only, each once, in order; BOS is never a target
    assert torch.equal(windows[:, 1:].reshape(-1), ids[: 10 * 15])
    assert result.tokens_evaluated == 10 * 15 == result.windows * (result.seq_len - 1)
    assert result.perplexity == pytest.approx(256.0, rel=1e-6)


def test_bos_convention_follows_the_tokenizer():
    from _tiny import tiny_text

    text = tiny_text(300, seed=3)
    model = make_tiny_model("llama")
    run = lambda tok, data, **kw: perplexity(model, tok, data, seq_len=32, progress=False, **kw)  # noqa: E731
    with_bos, declares_only = bos_tokenizer(True), bos_tokenizer(False)
    ids = torch.tensor(with_bos(text, add_special_tokens=False)["input_ids"])
    a = run(with_bos, text)
    assert a.bos and a.windows == 300 // 31 and a.tokens_evaluated == a.windows * 31
    assert run(with_bos, ids) == a  # token ids with the tokenizer: the tokenizer's convention
    assert run(None, ids, add_bos=False) == run(with_bos, ids, add_bos=False)
    no_bos = run(declares_only, text)  # a declared bos_token that is never added is not used
    assert not no_bos.bos and no_bos.windows == 300 // 32 and no_bos == run(None, ids)
    assert run(declares_only, text, add_bos=True) == a
    with torch.no_grad():  # a BOS window is scored like the model's own loss on BOS + text
        w = torch.cat([torch.tensor([BOS]), ids[:31]])[None]
        first = run(with_bos, ids[:31])
        assert first.nll == pytest.approx(model(w, labels=w).loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="add_bos=True needs a tokenizer with a BOS token"):
        run(None, ids, add_bos=True)


def test_evaluate_model_reports_the_bos_convention():
    from _tiny import tiny_text

    model = make_tiny_model("llama")
    report = evaluate_model(
        model, bos_tokenizer(), tiny_text(200), seq_len=32, run_throughput=False, progress=False
    )
    assert report["bos"] is True and report["tokens_evaluated"] == report["windows"] * 31
    assert ("BOS at window start", "yes") in report_rows(report)


# ----------------------------------------------------------------------------- memory


def _linear_params(cfg) -> int:
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    q = cfg.num_attention_heads * cfg.head_dim
    qkv_bias = q + 2 * kv if cfg.model_type == "qwen2" else 0  # Qwen2 has biases on q, k, v
    return cfg.num_hidden_layers * (h * q + 2 * h * kv + q * h + 3 * h * i + qkv_bias)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_report_counts_and_measured_kv_cache(arch, dtype):
    model = make_tiny_model(arch).to(dtype)
    cfg = model.config
    report = memory_report(model, tokens=24)
    assert report.parameters == sum(p.numel() for p in model.parameters())
    assert report.decoder_linear_parameters == _linear_params(cfg)
    assert report.weight_bytes == report.parameters * dtype.itemsize
    # K and V of every layer: layers x 2 x kv_heads x head_dim elements per token
    expected_kv = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize
    assert report.kv_cache_bytes_per_token == expected_kv


def test_tied_embeddings_counted_once():
    tied = make_tiny_model("llama", tie_word_embeddings=True)
    untied = make_tiny_model("llama")
    emb = tied.config.vocab_size * tied.config.hidden_size
    assert memory_report(untied, tokens=4).parameters - memory_report(tied, tokens=4).parameters == emb


def test_factor_pairs_inside_layers_are_counted():
    model = make_tiny_model("llama")
    before = memory_report(model, tokens=4).decoder_linear_parameters
    attn = model.model.layers[0].self_attn
    out_f, in_f = attn.q_proj.weight.shape
    factors = nn.Sequential(nn.Linear(in_f, 8, bias=False), nn.Linear(8, out_f, bias=False))
    factors.in_features, factors.out_features = in_f, out_f  # a drop-in replacement keeps these
    attn.q_proj = factors
    after = memory_report(model, tokens=4).decoder_linear_parameters
    assert before - after == out_f * in_f - 8 * (in_f + out_f)


def test_tensor_bytes_walks_objects_and_dedups_storage():
    base = torch.zeros(10, 4)  # 160 bytes

    class Holder:
        __slots__ = ("a", "b")

        def __init__(self):
            self.a, self.b = base[:5], {"again": base, "other": [torch.ones(3, dtype=torch.float64)]}

    holder = SimpleNamespace(x=Holder(), y=(base.t(),), layer=nn.Linear(100, 100), n=torch.tensor(5))
    assert tensor_bytes(holder) == 160 + 24  # module weights and scalars are not charged


# ----------------------------------------------------------------------------- throughput and report


def test_throughput_uses_the_cache_one_token_per_step():
    model = make_tiny_model("llama")
    lengths = []
    model.register_forward_pre_hook(lambda m, a, kw: lengths.append(kw["input_ids"].shape), with_kwargs=True)
    result = throughput(model, batch_size=2, prompt_len=9, gen_len=5, warmup=1, repeats=2, progress=False)
    assert lengths == [(2, 9)] + [(2, 1)] * 5 + ([(2, 9)] + [(2, 1)] * 5) * 2
    assert result.prefill_tokens_per_s == pytest.approx(2 * 9 / result.prefill_seconds)
    assert result.decode_tokens_per_s == pytest.approx(2 * 5 / result.decode_seconds)
    assert result.prefill_seconds > 0 and result.decode_seconds > 0
    if sys.platform == "linux":
        assert result.peak_memory_kind == "process_peak_rss" and result.peak_memory_bytes > 0
    with pytest.raises(ValueError, match="repeats"):
        throughput(model, repeats=0, progress=False)


def test_throughput_beyond_the_position_limit_is_refused_before_any_compute():
    model = make_tiny_model("llama")  # max_position_embeddings=512
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(ValueError, match=r"100 \+ 500 = 600 exceeds .*max_position_embeddings=512") as info:
        throughput(model, prompt_len=100, gen_len=500, progress=False)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        paired_throughput(
            {"ok": make_tiny_model("llama", max_position_embeddings=4096), "short": model},
            prompt_len=1_000,
            gen_len=1,
            progress=False,
        )
    assert calls == []
    throughput(model, prompt_len=500, gen_len=12, warmup=0, repeats=1, progress=False)  # exactly 512 is fine


def test_paired_throughput_interleaves_the_models_runs():
    order = []
    models = {}
    for name in ("a", "b"):
        model = make_tiny_model("llama")
        model.register_forward_pre_hook(
            lambda m, a, kw, name=name: order.append(name) if kw["input_ids"].shape[1] > 1 else None,
            with_kwargs=True,
        )
        models[name] = model
    result = paired_throughput(models, repeats=3, prompt_len=7, gen_len=2, progress=False)
    # one warm-up prefill each, then rounds A B, A B, A B
    assert order == ["a", "b"] + ["a", "b"] * 3
    assert set(result) == {"a", "b"}
    for r in result.values():
        assert r.repeats == 3 and r.prompt_len == 7 and r.gen_len == 2
        assert r.prefill_tokens_per_s == pytest.approx(7 / r.prefill_seconds)
    with pytest.raises(ValueError, match="repeats >= 1"):
        paired_throughput(models, repeats=0)


def test_evaluate_model_report_is_json_ready():
    model = make_tiny_model("mistral")
    ids = random_tokens(1, 200, seed=4)[0]
    report = evaluate_model(model, None, ids, seq_len=32, prompt_len=8, gen_len=3, repeats=1, progress=False)
    for key in (
        "perplexity",
        "tokens_evaluated",
        "parameters",
        "kv_cache_bytes_per_token",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
    ):
        assert report[key] is not None and report[key] > 0, key
    assert report["perplexity"] == pytest.approx(
        perplexity(model, None, ids, seq_len=32, progress=False).perplexity
    )
    json.dumps(report)
    quick = evaluate_model(model, None, ids, seq_len=32, run_throughput=False, progress=False)
    assert quick["decode_tokens_per_s"] is None and quick["perplexity"] == report["perplexity"]


def test_cli_evaluate_writes_json(tmp_path, capsys):
    from _tiny import save_tiny_model_dir, tiny_text

    from lowrank.cli import main

    save_tiny_model_dir(tmp_path / "m")
    (tmp_path / "t.txt").write_text(tiny_text(300), encoding="utf-8")
    out = tmp_path / "r.json"
    argv = [
        "evaluate",
        "--model",
        str(tmp_path / "m"),
        "--data",
        str(tmp_path / "t.txt"),
        "--seq-len",
        "64",
        "--max-windows",
        "3",
        "--gen-len",
        "2",
        "--prompt-len",
        "4",
        "--repeats",
        "1",
        "--json",
        str(out),
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["windows"] == 3 and report["tokens_evaluated"] == 3 * 63
    assert "perplexity" in capsys.readouterr().out
    zero = argv[: argv.index("--max-windows") + 1] + ["0", "--no-throughput", "--device", "cpu"]
    assert main(zero) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lowrank evaluate: error: --max-windows must be >= 1 (omit it for the whole split); got 0"]
    assert main(["evaluate", "--model", "gpt-17", "--no-throughput"]) == 2
    assert "built-in models: smollm2-135m" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smollm():
    from lowrank.loading.models import load_model

    return load_model("smollm2-135m")


@pytest.mark.integration
def test_real_model_perplexity_is_plausible(smollm):
    from lowrank.io.data import load_text

    model, tokenizer = smollm
    wiki = perplexity(model, tokenizer, load_text("wiki", "test"), seq_len=512, max_windows=3, progress=False)
    assert wiki.tokens_evaluated == 3 * 511
    assert 8 < wiki.perplexity < 40, wiki
    plays = load_text("shakespeare", "test")[:20_000]  # a prefix holds the two windows
    bard = perplexity(model, tokenizer, plays, seq_len=512, max_windows=2, progress=False)
    assert math.isfinite(bard.perplexity) and bard.perplexity > wiki.perplexity  # out of domain


@pytest.mark.integration
def test_real_model_adds_no_bos_and_keeps_its_protocol(smollm):
    from lowrank.io.data import default_bos_id, load_text, tokenize

    model, tokenizer = smollm
    assert default_bos_id(tokenizer) is None  # SmolLM2's tokenizer prepends nothing
    text = load_text("wiki", "test")[:20_000]
    result = perplexity(model, tokenizer, text, seq_len=256, max_windows=2, progress=False)
    assert not result.bos and result.tokens_evaluated == 2 * 255
    ids = tokenize(tokenizer, text)
    with torch.no_grad():  # the protocol before BOS handling: plain windows of seq_len text tokens
        windows = ids[: 2 * 256].view(2, 256)
        expected = torch.stack([model(w[None], labels=w[None]).loss for w in windows]).mean().item()
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result == perplexity(
        model, tokenizer, ids, seq_len=256, max_windows=2, add_bos=False, progress=False
    )


@pytest.mark.integration
def test_real_model_kv_cache_is_measured(smollm):
    model, _ = smollm
    report = memory_report(model, tokens=16)
    # 30 layers x (K + V) x 3 kv heads x 64 dims x 4 bytes (float32) = 46,080 bytes per token
    assert report.kv_cache_bytes_per_token == 30 * 2 * 3 * 64 * 4
    assert report.parameters == 134_515_008  # embeddings tied to the LM head, counted once
