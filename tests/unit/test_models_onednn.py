"""oneDNN linear layers compute what `nn.Linear` computes, forward and backward, and step aside elsewhere."""

import copy
import os
import subprocess
import sys
import time

import pytest
import torch
from peft import LoraConfig, get_peft_model

from posttrain.models import machine_choices, onednn
from posttrain.models.onednn import (
    OneDNNLinear,
    onednn_linear_available,
    onednn_linear_preferred,
    onednn_ops_available,
    use_onednn_linears,
    use_torch_linears,
)

needs_onednn = pytest.mark.skipif(not onednn_ops_available(), reason="this torch build has no oneDNN linear ops")


@pytest.fixture(autouse=True)
def _onednn_wanted(monkeypatch):
    """These tests are about the oneDNN path: on, whatever the CPU (auto would leave an AVX2-only CPU on
    MKL) and whatever POSTTRAIN_ONEDNN the caller's environment has."""
    monkeypatch.setenv("POSTTRAIN_ONEDNN", "1")


@pytest.mark.parametrize("choice,flags,measured,packed_measured,expected,packed_expected", [
    ("auto", "avx2 avx512f avx512_bf16", "onednn", None, True, True),  # e.g. an AMD Zen 5: oneDNN measured ~2x MKL
    ("auto", "avx2 avx512f amx_bf16", "torch", None, False, True),  # a Zen 4 or a Xeon with AMX: no faster, more memory
    ("auto", "avx2 fma", None, "onednn", False, True),  # AVX2 only (a Zen 2): training never swapped, decode measured
    ("auto", "avx2 fma", None, "torch", False, False),
    ("1", "avx2 fma", None, None, True, True), ("0", "avx2 avx512f", None, None, False, False)])
def test_the_gemm_library_is_measured_on_avx512_cpus_unless_the_environment_says(
        monkeypatch, tmp_path, choice, flags, measured, packed_measured, expected, packed_expected):
    monkeypatch.setenv("POSTTRAIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(machine_choices, "_choices", {})
    monkeypatch.setattr(onednn, "cpu_flags", lambda: frozenset(flags.split()))
    monkeypatch.setattr(onednn, "onednn_ops_available", lambda: True)
    measurements, packed_measurements = [], []
    monkeypatch.setattr(onednn, "_measure_training_linears", lambda: measurements.append(1) or measured)
    monkeypatch.setattr(onednn, "_measure_packed_linears", lambda: packed_measurements.append(1) or packed_measured)
    monkeypatch.setenv("POSTTRAIN_ONEDNN", choice)
    assert onednn_linear_preferred() is expected
    assert onednn_linear_preferred() is expected and len(measurements) == (measured is not None)  # measured once
    # the rollout engine's once-reordered weights take oneDNN on any AVX-512 CPU, unmeasured; elsewhere measured once
    for _ in range(2):
        assert onednn_linear_preferred(packed_weights=True) is packed_expected
    assert len(packed_measurements) == (packed_measured is not None)
    monkeypatch.setenv("POSTTRAIN_ONEDNN", "yes")
    with pytest.raises(ValueError, match="POSTTRAIN_ONEDNN must be auto, 0 or 1"):
        onednn_linear_preferred()


def _slowed(function, seconds):
    def run(*args):
        time.sleep(seconds)
        return function(*args)
    return run


@needs_onednn
@pytest.mark.parametrize("measure,onednn_op,torch_slow,onednn_slow", [
    # oneDNN's training path runs three products a round (forward, input and weight gradients), torch's is slowed once
    ("_measure_training_linears", "matmul_transposed", 0.15, 0.05),
    ("_measure_packed_linears", "packed_linear", 0.01, 0.01)])  # the decode products, each weight reordered once
def test_measuring_answers_with_the_library_that_was_faster_by_the_margin(monkeypatch, measure, onednn_op, torch_slow,
                                                                         onednn_slow):
    """With one library made artificially slow, the measurement must answer with the other; a tie (both as fast)
    goes to torch's own GEMM, and so does a oneDNN that fails."""
    monkeypatch.setattr(onednn, "MEASURED_SHAPES", ((64, 32, 16),))
    monkeypatch.setattr(onednn, "DECODE_ROWS", 4)
    measured = getattr(onednn, measure)
    torch_linear, onednn_product = torch.nn.functional.linear, getattr(onednn, onednn_op)
    monkeypatch.setattr(torch.nn.functional, "linear", _slowed(torch_linear, torch_slow))
    assert measured() == "onednn"
    monkeypatch.setattr(torch.nn.functional, "linear", torch_linear)
    monkeypatch.setattr(onednn, onednn_op, _slowed(onednn_product, onednn_slow))
    assert measured() == "torch"
    monkeypatch.setattr(torch.nn.functional, "linear", _slowed(torch_linear, torch_slow))  # a tie
    assert measured() == "torch"

    def failing(*args):
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(onednn, onednn_op, failing)
    assert measured() == "torch"


@needs_onednn
def test_a_packed_product_is_the_linear_in_float64():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(64, 48), torch.randn(40, 48), torch.randn(40)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 64)
    for b in (bias, None):
        torch.testing.assert_close(onednn.packed_linear(x, packed, b).double(), _reference_linear(x, weight, b),
                                   rtol=1e-5, atol=1e-5)


def _reference_linear(x, weight, bias):
    """The same affine map in float64: the slow obvious reference both GEMM libraries are compared with."""
    y = x.double() @ weight.double().T
    return y if bias is None else y + bias.double()


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
def test_forward_and_all_gradients_match_float64(bias, input_grad):
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 40, bias=bias)
    assert use_onednn_linears(layer) == 1 and type(layer) is OneDNNLinear
    x = torch.randn(3, 7, 96, requires_grad=input_grad)
    upstream = torch.randn(3, 7, 40)
    y = layer(x)
    (y * upstream).sum().backward()

    x64 = x.detach().double().requires_grad_(input_grad)
    w64 = layer.weight.detach().double().requires_grad_(True)
    b64 = layer.bias.detach().double().requires_grad_(True) if bias else None
    y64 = _reference_linear(x64, w64, b64)
    (y64 * upstream.double()).sum().backward()

    tol = {"rtol": 1e-5, "atol": 1e-5}
    assert y.shape == (3, 7, 40) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y64, **tol)
    torch.testing.assert_close(layer.weight.grad.double(), w64.grad, **tol)
    if bias:
        torch.testing.assert_close(layer.bias.grad.double(), b64.grad, **tol)
    if input_grad:
        torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    else:
        assert x.grad is None


@pytest.mark.parametrize("tokens,features,outputs,expected", [
    (2000, 512, (1408, 1408), True),  # an MLP's gate and up: one Xᵀ [512, 2000] for both, two small transposes
    (2000, 512, (512, 512, 512), True),  # q, k and v
    (2000, 512, (512,), False),  # o: Xᵀ and dYᵀ as large, plus a transpose
    (2000, 1408, (512,), False),  # down: dYᵀ is the smaller copy
    (300, 512, (1408, 1408), False),  # few tokens: the [in, out] transposes cost more than dYᵀ
    (2000, 512, (1408,), True)])  # one linear, wider out than in
def test_the_weight_gradient_copies_the_smaller_transpose(tokens, features, outputs, expected):
    """The way chosen copies fewer elements: hand-counted tokens x in + outs x in against outs x tokens."""
    x = torch.empty(tokens, features)
    group = onednn._SharedInput(x)
    for out in outputs:
        group.join(out)
    assert group.swapped(x) is expected


@needs_onednn
@pytest.mark.parametrize("outputs", [(96, 96, 24), (96,), (8, 8)])
def test_linears_sharing_an_input_match_float64_and_copy_its_transpose_once(monkeypatch, outputs):
    """q/k/v- and gate/up-like linears fed one tensor: every gradient as in float64, whichever way each weight gradient
    is computed; where the group's way is the transposed one, Xᵀ is copied once for all of them. Twice over the same
    graph (retain_graph): the gradients add up, the copy is made again."""
    torch.manual_seed(0)
    linears = [torch.nn.Linear(32, out, bias=out == 8) for out in outputs]
    references = [copy.deepcopy(linear).double() for linear in linears]
    for linear in linears:
        use_onednn_linears(linear)
    copies, groups = [], []
    original = onednn._SharedInput.input_transposed
    def spied(self, x):
        copies.append(self.transposed is None)
        groups.append(self)
        return original(self, x)

    monkeypatch.setattr(onednn._SharedInput, "input_transposed", spied)
    x = torch.randn(4, 125, 32, requires_grad=True)
    upstream = [torch.randn(4, 125, linear.out_features) for linear in linears]
    loss = sum((linear(x) * grad).sum() for linear, grad in zip(linears, upstream, strict=True))
    x64 = x.detach().double().requires_grad_(True)
    loss64 = sum((linear(x64) * grad.double()).sum() for linear, grad in zip(references, upstream, strict=True))
    transposed = outputs != (8, 8)  # 500 x 32 + outs x 32 against outs x 500 elements copied, by hand
    for repeat in (1, 2):
        loss.backward(retain_graph=True)
        loss64.backward(retain_graph=True)
        for linear, reference, grad in zip(linears, references, upstream, strict=True):
            # Each element sums 500 fp32 products: its rounding scales with the summands, sum |dY| |X| (the classical
            # dot-product bound; measured at 1-2e-7 of it), not with the result, which may be near zero.
            inputs = x.detach().reshape(-1, 32).double().abs()
            summands = grad.reshape(-1, linear.out_features).double().abs().T @ inputs
            assert ((linear.weight.grad.double() - reference.weight.grad).abs() <= 1e-6 * repeat * summands).all()
            assert linear.weight.grad.is_contiguous()
            if linear.bias is not None:
                torch.testing.assert_close(linear.bias.grad.double(), reference.bias.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
        # one copy per backward pass where transposed, read by every linear of the group, dropped when the pass ends
        assert copies == ([True] + [False] * (len(outputs) - 1)) * repeat if transposed else copies == []
        assert all(group.transposed is None for group in groups)
    if transposed:  # a backward pass that reaches one member only: the copy is dropped all the same
        copies.clear()
        torch.autograd.grad(loss, [linears[0].weight], retain_graph=True)
        assert copies == [True] and groups[-1].transposed is None


def test_a_group_is_one_tensor_unmodified_since():
    """Linears join the previous one's group only when fed that very tensor at the same version: not after an in-place
    change, not for another live tensor of equal values and version."""
    torch.manual_seed(0)
    x, y = torch.randn(50, 16), torch.randn(50, 16)
    group = onednn._input_group(x, 64)  # held, as a linear's autograd context holds it
    assert onednn._input_group(x, 32) is group and group.outputs == 64 + 32
    x.add_(1.0)
    assert onednn._input_group(x, 64) is not group
    y.copy_(x)  # equal values, and y's version now equals x's (one in-place change each)
    assert y._version == x._version and onednn._input_group(y, 64) is not onednn._input_group(x, 64)


@needs_onednn
@pytest.mark.parametrize("tokens", [24, 200])  # 4 x 200: the q/k/v and gate/up weight gradients take the transposed way
def test_a_whole_llama_trains_to_the_same_loss_and_gradients(tiny_model, tokens):
    torch.manual_seed(0)
    # build_model swapped them: q, k, v, o, gate, up, down per layer + lm_head
    assert sum(type(m) is OneDNNLinear for m in tiny_model.modules()) == 4 * 7 + 1
    assert use_onednn_linears(tiny_model) == 0  # idempotent
    reference = copy.deepcopy(tiny_model)
    assert use_torch_linears(reference) == 4 * 7 + 1  # the reference runs torch's own GEMM
    assert not any(type(m) is OneDNNLinear for m in reference.modules())
    assert tiny_model.state_dict().keys() == reference.state_dict().keys()
    ids = torch.randint(0, tiny_model.config.vocab_size, (4, tokens))
    losses = []
    for model in (tiny_model, reference):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(tiny_model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


@needs_onednn
def test_other_dtypes_and_autocast_take_torchs_own_path():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8).to(torch.bfloat16)
    plain = copy.deepcopy(layer)
    use_onednn_linears(layer)
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    assert torch.equal(layer(x), plain(x))  # bitwise: the very same call
    layer32 = torch.nn.Linear(16, 8)
    plain32 = copy.deepcopy(layer32)
    use_onednn_linears(layer32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer32(x.float()), plain32(x.float()))


@needs_onednn
def test_only_plain_linears_are_swapped_and_lora_wraps_them(tiny_model, monkeypatch):
    class Custom(torch.nn.Linear):  # a subclass has its own forward: left alone
        pass

    holder = torch.nn.Sequential(torch.nn.Linear(4, 4), Custom(4, 4), torch.nn.Conv1d(4, 4, 1))
    assert use_onednn_linears(holder) == 1 and type(holder[1]) is Custom
    monkeypatch.setenv("POSTTRAIN_ONEDNN", "0")
    assert onednn_ops_available() and not onednn_linear_available()
    assert use_onednn_linears(torch.nn.Linear(4, 4)) == 0
    monkeypatch.setenv("POSTTRAIN_ONEDNN", "1")

    use_onednn_linears(tiny_model)
    lora = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 12))
    lora(input_ids=ids, labels=ids).loss.backward()
    trained = {name for name, p in lora.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in name for name in trained)


@pytest.mark.parametrize("variable", ["ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"])
@pytest.mark.parametrize(("preset", "expected"), [(None, "24"), ("8", "8")])
def test_import_caps_the_primitive_caches_unless_the_user_set_them(variable, preset, expected):
    """oneDNN's cache and torch's in front of it read their variables at first use: they must be in the environment
    from import on, and a user's own setting wins. (A fresh interpreter: this one has imported the module already.)"""
    env = {k: v for k, v in os.environ.items() if k != variable}
    if preset is not None:
        env[variable] = preset
    code = f"import os, posttrain.models.onednn; print(os.environ[{variable!r}])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == expected


@pytest.mark.skipif(not onednn_ops_available(), reason="this torch build has no oneDNN linear ops")
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set from /proc (Linux)")
def test_products_of_ever_new_row_counts_do_not_grow_memory_without_bound():
    """The engine's prefill has as many rows as its round's prompt tokens: a new shape nearly every round. With the
    caches at their default (1024 shapes each) 1,800 shapes of the tiny model's products grew the resident set by
    ~620 MB, as a long RL run grew (~0.6 MB a step); capped at import, ~30 MB. In a fresh interpreter, whose caches
    hold nothing yet, without the variables set."""
    code = """
import os, torch
from posttrain.models.onednn import packed_linear
def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
shapes = ((128, 128), (128, 512), (512, 128))  # (in, out) of the tiny model's linears
weights = [torch.ops.mkldnn._reorder_linear_weight(torch.randn(out, inputs), 64) for inputs, out in shapes]
with torch.inference_mode():
    for first, last in ((1, 100), (100, 700)):  # the first hundred shapes fill the capped caches
        start = resident_mb()
        for rows in range(first, last):
            for (inputs, _), weight in zip(shapes, weights):
                packed_linear(torch.randn(rows, inputs), weight)
print(resident_mb() - start)
"""
    env = {k: v for k, v in os.environ.items() if k not in onednn.CACHE_CAPACITY_VARIABLES}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert float(out) < 150, f"the resident set grew {float(out):.0f} MB over 1,800 product shapes"
