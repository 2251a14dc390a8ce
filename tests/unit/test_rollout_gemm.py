"""The decoder's oneDNN linear path computes what `nn.Linear` computes, and leaves other modules alone."""

import torch

from posttrain.models.onednn import onednn_linear_available
from posttrain.rollout.gemm import LinearRunner


def test_packed_linear_matches_the_module_and_hooked_or_other_modules_run_as_themselves():
    torch.manual_seed(0)
    plain, no_bias, hooked = torch.nn.Linear(48, 40), torch.nn.Linear(48, 24, bias=False), torch.nn.Linear(48, 8)
    hooked.register_forward_hook(lambda module, inputs, output: output + 1000.0)
    other = torch.nn.Sequential(torch.nn.Linear(48, 8))  # not an nn.Linear: must be called as itself
    runner = LinearRunner([plain, no_bias, hooked, other], batch_hint=16)
    assert set(runner.packed) == ({plain, no_bias} if onednn_linear_available() else set())
    x = torch.randn(16, 48)
    with torch.inference_mode():
        for module in (plain, no_bias, hooked, other):
            reference = x @ module[0].weight.T + module[0].bias if module is other else module(x)
            torch.testing.assert_close(runner(module, x), reference, rtol=1e-5, atol=1e-5)
        assert runner(hooked, x).min() > 900  # the hook ran
        odd = torch.randn(5, 48)  # another row count than the layout was tuned for
        torch.testing.assert_close(runner(plain, odd), odd @ plain.weight.T + plain.bias, rtol=1e-5, atol=1e-5)
    assert not LinearRunner([plain], batch_hint=16, onednn=False).packed
