"""Attention under CPU bf16 autocast: fp32 where measured faster, the same values as an obvious float64
attention, the choice kept per machine, and nothing changed outside bf16 autocast."""

import copy
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.config import ModelConfig
from posttrain.models import build_model, cpu_attention, machine_choices, matmul_attention
from posttrain.models.cpu_attention import ATTENTION, kernel, use_cpu_attention
from posttrain.models.machine_choices import cache_file


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch, tmp_path):
    """Each test with an empty choice cache of its own, in memory and on disk."""
    monkeypatch.setenv("POSTTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(machine_choices, "_choices", {})


def _reference_attention(q, k, v, mask):
    """softmax(q kᵀ / √d + mask) v in float64, one (row, head) at a time: the slow obvious loop."""
    rows, heads, queries, dim = q.shape
    out = torch.zeros(rows, queries, heads, dim, dtype=torch.float64)
    for r in range(rows):
        for h in range(heads):
            scores = q[r, h].double() @ k[r, h].double().T / math.sqrt(dim)
            scores = scores.masked_fill(~mask[r, 0], float("-inf"))
            out[r, :, h] = torch.softmax(scores, dim=-1) @ v[r, h].double()
    return out


class _Attention(torch.nn.Module):
    num_key_value_groups, is_causal = 1, True


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_under_bf16_autocast_the_fp32_choice_computes_attention_in_fp32(monkeypatch, mask_kind):
    monkeypatch.setenv("POSTTRAIN_CPU_ATTENTION", "fp32")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 16).bfloat16().requires_grad_() for _ in range(3))
    allowed = torch.ones(7, 7, dtype=torch.bool).tril()[None, None].expand(2, 1, 7, 7).clone()
    allowed[1, :, :, :2] = False  # row 1's first two keys hidden (padding), its first two queries see themselves
    allowed[1, :, torch.arange(2), torch.arange(2)] = True
    mask = allowed if mask_kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo().min)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = cpu_attention._forward(_Attention(), q, k, v, mask)
    expected = _reference_attention(q, k, v, allowed)
    assert out.dtype == torch.bfloat16  # what autocast's SDPA hands the output projection
    # fp32 products of the bf16 inputs, rounded once to bf16 at the end: within one bf16 rounding (2^-8 relative)
    torch.testing.assert_close(out.double(), expected, rtol=2 ** -8, atol=1e-6)
    out.double().pow(2).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_the_bf16_choice_and_every_forward_outside_bf16_autocast_are_transformers_sdpa(monkeypatch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 16) for _ in range(3))
    monkeypatch.setenv("POSTTRAIN_CPU_ATTENTION", "fp32")
    assert torch.equal(cpu_attention._forward(_Attention(), q, k, v, None)[0],
                       sdpa_attention_forward(_Attention(), q, k, v, None)[0])  # fp32: no autocast, untouched
    monkeypatch.setenv("POSTTRAIN_CPU_ATTENTION", "bf16")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = cpu_attention._forward(_Attention(), q, k, v, None)[0]
        theirs = sdpa_attention_forward(_Attention(), q, k, v, None)[0]
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_a_float64_or_float16_models_attention_under_bf16_autocast_stays_in_its_dtype(monkeypatch, dtype):
    """A float64 model under train.precision=auto got fp32 attention handed back as bf16 (its float64 output
    projection then failed), and measuring a float64 mask's bucket failed inside SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 16, dtype=dtype) for _ in range(3))
    mask = torch.zeros(2, 1, 7, 7, dtype=dtype).masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(),
                                                             torch.finfo(dtype).min)
    for choice in ("fp32", "auto"):
        monkeypatch.setenv("POSTTRAIN_CPU_ATTENTION", choice)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = cpu_attention._forward(_Attention(), q, k, v, mask)[0]
            theirs = sdpa_attention_forward(_Attention(), q, k, v, mask)[0]
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    assert machine_choices._choices == {}  # nothing measured for it


def test_an_unknown_choice_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CPU_ATTENTION", "fast")
    with pytest.raises(ValueError, match="POSTTRAIN_CPU_ATTENTION must be one of auto, fp32, bf16, matmul"):
        kernel(torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8), None)


def test_auto_measures_once_per_bucket_and_a_new_process_reads_the_machines_answer(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CPU_ATTENTION", "auto")
    measured = []
    monkeypatch.setattr(cpu_attention, "_measure", lambda bucket, kernels: measured.append(bucket) or "fp32")
    q, k = torch.zeros(5, 4, 100, 32), torch.zeros(5, 4, 100, 32)
    assert kernel(q, k, None) == "fp32"
    assert kernel(torch.zeros(8, 4, 128, 32), torch.zeros(8, 4, 128, 32), None) == "fp32"  # same bucket: 8 rows, 128
    assert measured == [(8, 4, 4, 128, 128, 32, "none")]
    stored = json.loads(cache_file().read_text())
    assert list(stored.values()) == ["fp32"] and torch.__version__ in next(iter(stored))
    monkeypatch.setattr(machine_choices, "_choices", {})  # a new process: memory empty, the file stays
    assert kernel(q, k, None) == "fp32" and len(measured) == 1
    mask = torch.ones(5, 1, 100, 100, dtype=torch.bool)
    monkeypatch.setattr(cpu_attention, "_measure", lambda bucket, kernels: measured.append(bucket) or "matmul")
    assert kernel(q, k, mask) == "matmul"  # another mask kind is another bucket
    assert len(json.loads(cache_file().read_text())) == 2
    # a new revision of the GEMM kernel (its cost changed): the machine's answers are measured again, in a new process
    monkeypatch.setattr(matmul_attention, "REVISION", matmul_attention.REVISION + 1)
    monkeypatch.setattr(machine_choices, "_choices", {})
    assert kernel(q, k, None) == "matmul" and len(measured) == 3


@pytest.mark.parametrize("fastest", cpu_attention.KERNELS)
def test_measuring_answers_with_the_fastest_kernel(monkeypatch, fastest):
    """`_measure` times every kernel as `_forward` runs it: with the two others made artificially slow it must
    answer the third."""
    import time
    real = cpu_attention._run
    ran = set()

    def slowed(way, *args, **kwargs):
        ran.add(way)
        if way != fastest:
            time.sleep(0.02)
        return real(way, *args, **kwargs)

    monkeypatch.setattr(cpu_attention, "_run", slowed)
    assert cpu_attention._measure((2, 2, 2, 16, 16, 8, "float32")) == fastest
    assert ran == set(cpu_attention.KERNELS)


def test_models_switch_from_sdpa_only_and_save_as_plain_transformers_models(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CPU_ATTENTION", "fp32")
    # the plain transformers model's linears are torch's: where the measured GEMM choice picks oneDNN (timing-based,
    # so it can on a loaded machine), build_model's would not be bit for bit the same, and that is not this test's
    # subject
    monkeypatch.setenv("POSTTRAIN_ONEDNN", "0")
    model = build_model(ModelConfig(size="tiny"), tokenizer, seed=0)
    assert model.config._attn_implementation == ATTENTION and use_cpu_attention(model) == 0  # idempotent
    ids = torch.randint(0, len(tokenizer), (2, 9))
    plain = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation="sdpa")
    plain.load_state_dict(model.state_dict())
    seen = []
    real = cpu_attention.sdpa_attention_forward
    monkeypatch.setattr(cpu_attention, "sdpa_attention_forward", lambda module, q, *args, **kwargs: (
        seen.append((q.dtype, torch.is_autocast_enabled("cpu"))) or real(module, q, *args, **kwargs)))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)  # fp32: transformers' SDPA, bit for bit
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids)
    layers = model.config.num_hidden_layers
    # fp32 without autocast, then under bf16 autocast every layer's attention on fp32 copies with autocast off
    assert seen == [(torch.float32, False)] * layers * 2
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation="eager")
    assert use_cpu_attention(eager) == 0 and eager.config._attn_implementation == "eager"
    model.save_pretrained(tmp_path / "saved")
    assert ATTENTION not in (tmp_path / "saved" / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved").config._attn_implementation == "sdpa"
