"""The decoder's oneDNN linear path computes what `nn.Linear` computes, and leaves other modules alone."""

import torch

from posttrain.models.onednn import onednn_bf16_available, onednn_linear_available
from posttrain.rollout.gemm import LinearRunner


def test_packed_linear_matches_the_module_and_hooked_or_other_modules_run_as_themselves():
    torch.manual_seed(0)
    plain, no_bias, hooked = torch.nn.Linear(48, 40), torch.nn.Linear(48, 24, bias=False), torch.nn.Linear(48, 8)
    hooked.register_forward_hook(lambda module, inputs, output: output + 1000.0)
    other = torch.nn.Sequential(torch.nn.Linear(48, 8))  # not an nn.Linear: must be called as itself
    runner = LinearRunner([plain, no_bias, hooked, other], batch_hint=16)
    assert set(runner.packed) == ({plain, no_bias} if onednn_linear_available(packed_weights=True) else set())
    x = torch.randn(16, 48)
    with torch.inference_mode():
        for module in (plain, no_bias, hooked, other):
            reference = x @ module[0].weight.T + module[0].bias if module is other else module(x)
            torch.testing.assert_close(runner(module, x), reference, rtol=1e-5, atol=1e-5)
        assert runner(hooked, x).min() > 900  # the hook ran
        odd = torch.randn(5, 48)  # another row count than the layout was tuned for
        torch.testing.assert_close(runner(plain, odd), odd @ plain.weight.T + plain.bias, rtol=1e-5, atol=1e-5)
    assert not LinearRunner([plain], batch_hint=16, onednn=False).packed


def test_bf16_packs_bf16_weights_and_computes_what_autocast_computes():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    runner = LinearRunner([layer], batch_hint=8, dtype=torch.bfloat16)
    # packed where oneDNN has bf16 kernels; on an AVX2-only CPU autocast's own linear (the reorder would raise)
    assert set(runner.packed) == ({layer} if onednn_bf16_available() else set())
    x = torch.randn(8, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = runner(layer, x), layer(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    # bf16 products of bf16 inputs with fp32 accumulation: equal up to the final rounding to bf16.
    torch.testing.assert_close(out.float(), expected.float(), rtol=2**-7, atol=1e-2)
    exact = x.double() @ layer.weight.double().T + layer.bias.double()
    assert (out.double() - exact).abs().max() < 0.1 and (out.double() - exact).abs().max() > 0
    other = torch.nn.Linear(64, 16)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # one input, one cast, two products
        both = LinearRunner([layer, other], batch_hint=8, dtype=torch.bfloat16).each([layer, other], x)
        assert torch.equal(both[0], out) and torch.equal(both[1], runner(other, x))


def _affine(x, module):
    """`module`'s affine map in float64: the reference."""
    return x.double() @ module.weight.double().T + (0 if module.bias is None else module.bias.double())


def test_fused_modules_run_as_one_product_with_each_modules_output():
    """q/k/v-like linears stacked into one product: each output as the module computes it (a module without a bias
    next to ones with a bias adds zeros), column views of one tensor; a module of the group called alone still runs;
    a group whose inputs differ in width is not stacked."""
    torch.manual_seed(0)
    q, k, v = torch.nn.Linear(48, 40), torch.nn.Linear(48, 16, bias=False), torch.nn.Linear(48, 16)
    wide, narrow = torch.nn.Linear(48, 8), torch.nn.Linear(24, 8)
    x = torch.randn(16, 48)
    bf16 = LinearRunner([q, k, v], batch_hint=8, dtype=torch.bfloat16, fused=[(q, k, v)])
    assert set(bf16.fused) == ({(q, k, v)} if onednn_bf16_available() else set()) and not bf16.packed
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for module, out in zip((q, k, v), bf16.each([q, k, v], x), strict=True):
            expected = module(x)
            assert out.dtype == expected.dtype == torch.bfloat16
            # Both round an fp32 sum of the same bf16 products to bf16: at most one bf16 ulp apart (2^-7 of the value
            # at most), plus what a different order of the fp32 sum can move, which scales with the summands' sum.
            low = module.weight.bfloat16().double()
            summands = x.bfloat16().double().abs() @ low.abs().T
            if module.bias is not None:
                summands += module.bias.bfloat16().double().abs()
            gap = (out.double() - expected.double()).abs()
            assert (gap <= 2**-7 * expected.double().abs() + 1e-5 * summands).all()
    runner = LinearRunner([q, k, v, wide, narrow], batch_hint=16, fused=[(q, k, v), (wide, narrow)])
    if not onednn_linear_available(packed_weights=True):
        assert not runner.fused and not runner.packed
        return
    assert set(runner.fused) == {(q, k, v)} and set(runner.packed) == {wide, narrow}  # one packed copy of each weight
    with torch.inference_mode():
        outputs = runner.each([q, k, v], x)
        for module, out in zip((q, k, v), outputs, strict=True):
            torch.testing.assert_close(out.double(), _affine(x, module), rtol=1e-5, atol=1e-5)
        assert [o.shape for o in outputs] == [(16, 40), (16, 16), (16, 16)]
        assert len({o.untyped_storage().data_ptr() for o in outputs}) == 1  # one product
        torch.testing.assert_close(runner(k, x).double(), _affine(x, k), rtol=1e-5, atol=1e-5)  # alone: as a module
        odd = torch.randn(5, 48)  # another row count than the layout was tuned for
        torch.testing.assert_close(runner.each([q, k, v], odd)[2].double(), _affine(odd, v), rtol=1e-5, atol=1e-5)
