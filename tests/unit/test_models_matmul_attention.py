"""Attention as batched GEMMs (models.matmul_attention): transformers' SDPA semantics (masks, causality, grouped
heads, a query that sees nothing), the gradients of its hand-written backward against a slow float64 loop, and in
bf16 no less precise than torch's bf16 attention kernel."""

import math

import pytest
import torch
import torch.nn.functional as F

from posttrain.models import cpu_attention, machine_choices, matmul_attention


class _Attention(torch.nn.Module):
    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def _loop_attention(q, k, v, allowed, scale):
    """softmax(q kᵀ · scale) v in float64 over the allowed keys, one (row, head, query) at a time; a query that sees
    no key gets zeros. q [B, H, L, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv], allowed [B or 1, H or 1, L, S] ->
    [B, L, H, Dv]."""
    rows, heads, queries, _ = q.shape
    groups = heads // k.shape[1]
    allowed = allowed.expand(rows, heads, queries, k.shape[2])  # a mask of one row or one head broadcasts
    out = []
    for r in range(rows):
        for h in range(heads):
            for i in range(queries):
                seen = allowed[r, h, i].nonzero().flatten()
                if len(seen) == 0:
                    out.append(torch.zeros(v.shape[-1], dtype=torch.float64))
                    continue
                scores = torch.stack([q[r, h, i].double() @ k[r, h // groups, j].double() * scale for j in seen])
                out.append(torch.softmax(scores, 0) @ v[r, h // groups, seen].double())
    return torch.stack(out).view(rows, heads, queries, -1).transpose(1, 2)


def _inputs(dtype=torch.float64, rows=2, heads=4, kv_heads=2, queries=5, keys=7, dim=8, value_dim=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads, queries, dim, generator=generator, dtype=dtype, requires_grad=True)
    k = torch.randn(rows, kv_heads, keys, dim, generator=generator, dtype=dtype, requires_grad=True)
    v = torch.randn(rows, kv_heads, keys, value_dim, generator=generator, dtype=dtype, requires_grad=True)
    return q, k, v


def _mask_cases(rows=2, queries=5, keys=7):
    allowed = torch.rand(rows, 1, queries, keys, generator=torch.Generator().manual_seed(1)) < 0.6
    allowed[0, 0, 1] = False  # a query that sees no key at all (a padding row)
    allowed[1, 0, 3, :2] = True
    additive = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    return {"bool": (allowed, allowed), "additive -inf": (additive, allowed)}


@pytest.mark.parametrize("kind", ["bool", "additive -inf", "causal, no mask"])
def test_values_and_gradients_equal_a_float64_loop(kind):
    """Grouped heads (4 query heads on 2 key/value heads), values narrower than keys, an explicit scale."""
    q, k, v = _inputs(keys=5 if kind.startswith("causal") else 7)
    if kind.startswith("causal"):
        mask, allowed = None, torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 1, 5, 5)
    else:
        mask, allowed = _mask_cases()[kind]
    scale = 0.3
    out, weights = matmul_attention.attention(_Attention(groups=2), q, k, v, mask, scaling=scale)
    expected = _loop_attention(q, k, v, allowed, scale)
    assert weights is None and out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ours = torch.autograd.grad(out, (q, k, v), grad)
    theirs = torch.autograd.grad(expected, (q, k, v), grad)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if kind != "causal, no mask":  # the query that sees nothing: a zero output, and nothing flows back from it
        assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))


def test_defaults_are_sdpas_the_modules_causality_and_one_over_root_dim():
    q, k, v = _inputs(keys=5)
    module = _Attention(groups=2)
    out, _ = matmul_attention.attention(module, q, k, v, None)
    expected = _loop_attention(q, k, v, torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 1, 5, 5), 8 ** -0.5)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    module.is_causal = False  # an encoder's attention: every key
    out, _ = matmul_attention.attention(module, q, k, v, None)
    torch.testing.assert_close(out, _loop_attention(q, k, v, torch.ones(2, 1, 5, 5, dtype=torch.bool), 8 ** -0.5),
                               rtol=1e-12, atol=1e-12)
    # a single query (decoding) is never causal-masked: it sees every key
    out, _ = matmul_attention.attention(_Attention(groups=2), q[:, :, :1], k, v, None, is_causal=True)
    torch.testing.assert_close(out, _loop_attention(q[:, :, :1], k, v, torch.ones(2, 1, 1, 5, dtype=torch.bool),
                                                    8 ** -0.5), rtol=1e-12, atol=1e-12)


def test_a_nan_of_a_diverged_model_stays_nan_where_only_hidden_rows_become_zeros():
    q, k, v = _inputs()
    mask, _ = _mask_cases()["bool"]
    q = q.detach().clone()
    q[1, 0, 2, 0] = float("nan")
    out, _ = matmul_attention.attention(_Attention(groups=2), q, k, v, mask)
    assert out[1, 2, 0].isnan().all() and not out[1, 2, 1:].isnan().any()  # that query's head only
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))  # the query that sees no key


def test_causal_with_more_keys_than_queries_is_aligned_top_left_as_sdpas():
    q, k, v = _inputs(queries=3, keys=5)
    out, _ = matmul_attention.attention(_Attention(groups=2), q, k, v, None)
    allowed = torch.ones(3, 5, dtype=torch.bool).tril()  # query i sees keys 0..i
    torch.testing.assert_close(out, _loop_attention(q, k, v, allowed[None, None], 8 ** -0.5), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", ["one row for all", "one per head"])
def test_masks_broadcast_over_rows_or_differ_per_head(shape):
    """Values and gradients; a query that sees nothing in one head (or, broadcast, in every row) only."""
    q, k, v = _inputs()
    generator = torch.Generator().manual_seed(5)
    allowed = torch.rand((1, 1, 5, 7) if shape == "one row for all" else (2, 4, 5, 7), generator=generator) < 0.6
    allowed[..., 0] = True
    allowed[0, -1, 3] = False  # query 3 of the last head (of every head, one row for all) sees nothing
    out, _ = matmul_attention.attention(_Attention(groups=2), q, k, v, allowed)
    expected = _loop_attention(q, k, v, allowed, 8 ** -0.5)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if shape == "one per head":
        assert torch.equal(out[0, 3, 3], torch.zeros_like(out[0, 3, 3])) and out[0, 3, :3].abs().sum() > 0
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mask_dtype", [torch.float64, torch.bfloat16])
def test_a_finite_minimum_hides_as_sdpa_hides_it(mask_dtype):
    """collate_packed's and the prefix tree's masks hide with the dtype's minimum, not -inf: a query whose every key
    is hidden so attends to all of them evenly (SDPA's answer, float64 here), not to none."""
    q, k, v = _inputs()
    allowed, _ = _mask_cases()["bool"]
    mask = torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill(~allowed, torch.finfo(mask_dtype).min)
    out, _ = matmul_attention.attention(_Attention(groups=2), q, k, v, mask)
    from transformers.integrations.sdpa_attention import repeat_kv
    expected = F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=mask.double())
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-12, atol=1e-12)
    assert not torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))


def test_strided_inputs_as_transformers_hands_them_over():
    q, k, v = _inputs()
    strided = [t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v)]
    assert not any(t.is_contiguous() for t in strided)
    mask, _ = _mask_cases()["bool"]
    out, _ = matmul_attention.attention(_Attention(groups=2), q, k, v, mask)
    strided_out, _ = matmul_attention.attention(_Attention(groups=2), *strided, mask)
    torch.testing.assert_close(strided_out, out, rtol=1e-14, atol=1e-14)
    grad = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(7))
    for strided_grad, expected in zip(torch.autograd.grad(strided_out, strided, grad),
                                      torch.autograd.grad(out, (q, k, v), grad), strict=True):
        torch.testing.assert_close(strided_grad, expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("precision", ["float64", "bf16"])
@pytest.mark.parametrize("needed", ["query", "key", "value", "query+value"])
def test_only_the_gradients_asked_for_are_computed_and_they_are_the_full_backwards(needed, precision):
    """LoRA on some projections only: the inputs that need no gradient get none (the backward skips their
    products), the others get what the full backward gives them, in their own dtype. bf16: the inputs a Llama layer
    hands over under autocast (query and key fp32, value bf16), whose query and key gradients are bf16 products."""
    q, k, v = _inputs()
    if precision == "bf16":
        q, k, v = (t.detach().to(dtype).requires_grad_() for t, dtype in zip(
            (q, k, v), (torch.float32, torch.float32, torch.bfloat16), strict=True))
    mask, _ = _mask_cases()["bool"]
    grad = torch.randn(2, 5, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).to(v.dtype)
    full = torch.autograd.grad(matmul_attention.attention(_Attention(groups=2), q, k, v, mask)[0], (q, k, v), grad)
    inputs = [t.detach().clone().requires_grad_(name in needed) for t, name in zip((q, k, v), ("query", "key", "value"),
                                                                                   strict=True)]
    out, _ = matmul_attention.attention(_Attention(groups=2), *inputs, mask)
    out.backward(grad)
    for t, expected, name in zip(inputs, full, ("query", "key", "value"), strict=True):
        if name in needed:
            assert t.grad.dtype == t.dtype and t.grad.shape == t.shape
            torch.testing.assert_close(t.grad, expected, rtol=0, atol=0)
        else:
            assert t.grad is None


def _relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("values", ["random", "nearly equal"])
def test_in_bf16_it_is_as_precise_as_torchs_bf16_attention_kernel(values):
    """Inputs as a Llama layer hands them over under bf16 autocast (query and key fp32, value bf16): the output's
    and every gradient's error against float64 is within 1.25x of the error of torch's bf16 kernel (SDPA's flash
    kernel on bf16 copies), and far below what bf16 scores would cost. With nearly equal value rows the softmax
    backward's dP - sum_j P_j dP_j cancels its leading digits: dP rounded to bf16 there gave 1.35x flash's error."""
    rows, heads, queries, keys, dim = 4, 4, 32, 48, 64
    q, k, v = _inputs(torch.float32, rows, heads, heads, queries, keys, dim, dim, seed=3)
    q.data.mul_(2.0)  # scores of a few units, as in a trained model, where their rounding matters
    if values == "nearly equal":
        v.data.mul_(0.02).add_(1.0)
    allowed = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries).expand(rows, 1, queries, keys)
    grad = torch.randn(rows, queries, heads, dim, generator=torch.Generator().manual_seed(4))

    def errors(attend):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = attend(*leaves)
        out.backward(grad.to(out.dtype))
        reference_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        reference = F.scaled_dot_product_attention(*reference_leaves, attn_mask=allowed).transpose(1, 2)
        reference.backward(grad.double())
        return [_relative_error(out, reference)] + [_relative_error(a.grad, b.grad)
                                                      for a, b in zip(leaves, reference_leaves, strict=True)]

    ours = errors(lambda q, k, v: matmul_attention.attention(_Attention(), q, k, v.bfloat16(), allowed)[0])
    flash = errors(lambda q, k, v: F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(),
                                                                  attn_mask=allowed).transpose(1, 2))
    assert all(0 < a <= 1.25 * b for a, b in zip(ours, flash, strict=True)), (ours, flash)
    if values == "random":
        assert max(flash) < 2e-2  # the yardstick itself is bf16's: a few 2^-8


@pytest.mark.parametrize("call", [{"dropout": 0.1}, {"softcap": 30.0}, {"position_bias": torch.zeros(1)},
                                  {"s_aux": torch.zeros(4)}, {"mask_requires_grad": True}])
def test_it_declines_what_it_does_not_compute(call):
    mask = torch.zeros(1, 1, 3, 3, requires_grad=call.pop("mask_requires_grad", False))
    assert matmul_attention.handles(None) and matmul_attention.handles(torch.zeros(1, 1, 3, 3), dropout=0.0)
    assert not matmul_attention.handles(mask, **call)


@pytest.fixture()
def own_choices(monkeypatch, tmp_path):
    monkeypatch.setenv("POSTTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(machine_choices, "_choices", {})


def test_the_attention_function_runs_it_under_bf16_autocast_when_chosen(monkeypatch, own_choices):
    monkeypatch.setenv("POSTTRAIN_CPU_ATTENTION", "matmul")
    q, k, v = _inputs(torch.float32)
    mask, _ = _mask_cases()["bool"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = cpu_attention._forward(_Attention(groups=2), q, k, v, mask, dropout=0.0, scaling=0.25)
        direct, _ = matmul_attention.attention(_Attention(groups=2), q, k, v.bfloat16(), mask, scaling=0.25)
        declined, _ = cpu_attention._forward(_Attention(groups=2), q, k, v, mask, dropout=0.5, scaling=0.25)
    assert out.dtype == torch.bfloat16 and torch.equal(out, direct)
    assert not torch.equal(declined, out)  # dropout: transformers' SDPA computes it
    assert machine_choices._choices == {}  # a fixed choice measures nothing
    out, _ = cpu_attention._forward(_Attention(groups=2), q, k, v, mask)  # no autocast: transformers' SDPA in fp32
    assert out.dtype == torch.float32


def test_measuring_from_an_inference_mode_forward_times_on_tensors_of_its_own(own_choices):
    """The rollout engine samples under inference_mode: a bucket first met there is timed forward + backward all the
    same (an inference-mode mask could not be saved for the flash kernel's backward)."""
    with torch.inference_mode():
        assert cpu_attention._measure((2, 2, 2, 16, 16, 8, "float32")) in cpu_attention.KERNELS


def test_a_bucket_too_large_for_its_scores_is_not_offered_it(monkeypatch, own_choices):
    monkeypatch.setenv("POSTTRAIN_CPU_ATTENTION", "auto")
    offered = []
    monkeypatch.setattr(cpu_attention, "_measure", lambda bucket, kernels: offered.append(kernels) or kernels[-1])
    small = torch.zeros(2, 4, 16, 8)
    assert cpu_attention.kernel(small, small, None) == "matmul"
    side = math.isqrt(matmul_attention.MAX_SCORES // 4) * 2  # 1 row x 4 heads x side^2 scores > MAX_SCORES
    large = torch.zeros(1, 4, side, 8)
    assert cpu_attention.kernel(large, large, None) == "bf16"
    assert offered == [("fp32", "bf16", "matmul"), ("fp32", "bf16")]
    monkeypatch.setenv("POSTTRAIN_CPU_ATTENTION", "matmul")  # a fixed choice keeps the cap too
    assert cpu_attention.kernel(small, small, None) == "matmul" and cpu_attention.kernel(large, large, None) == "bf16"
