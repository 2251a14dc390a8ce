"""Lean MLPs and RMSNorms: bitwise the losses and gradients of transformers' modules, with less kept for backward."""

import copy
import gc
import io
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from posttrain.models.lean_layers import use_lean_layers

VOCAB, HIDDEN, FFN, LAYERS = 97, 64, 96, 2


def _model(model_type: str, dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=FFN,
                                  max_position_embeddings=64, attn_implementation="sdpa", **overrides)
    return AutoModelForCausalLM.from_config(config).to(dtype)


def _loss_and_grads(model, ids, autocast=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _assert_bitwise(model, lean, ids, autocast=False):
    loss, grads = _loss_and_grads(model, ids, autocast)
    lean_loss, lean_grads = _loss_and_grads(lean, ids, autocast)
    assert torch.equal(loss, lean_loss)
    assert grads.keys() == lean_grads.keys() and grads
    for name in grads:
        assert torch.equal(grads[name], lean_grads[name]), name


@pytest.mark.parametrize("model_type,norms_per_layer", [("llama", 2), ("qwen2", 2), ("mistral", 2), ("qwen3", 4)])
@pytest.mark.parametrize("precision", ["fp32", "bf16 autocast", "bf16 weights"])
def test_losses_and_gradients_are_bitwise_those_of_transformers_modules(model_type, norms_per_layer, precision):
    model = _model(model_type, torch.bfloat16 if precision == "bf16 weights" else torch.float32)
    lean = copy.deepcopy(model)
    # every layer's MLP and norms (Qwen3 also normalises queries and keys), and the final norm
    assert use_lean_layers(lean) == LAYERS * (1 + norms_per_layer) + 1
    ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    _assert_bitwise(model, lean, ids, autocast=precision == "bf16 autocast")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, lean(input_ids=ids).logits)
    assert use_lean_layers(lean) == 0  # idempotent
    assert lean.state_dict().keys() == model.state_dict().keys()


def test_lora_and_gradient_checkpointing_keep_the_gradients_bitwise():
    model = get_peft_model(_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "gate_proj", "up_proj"],
                                                       lora_dropout=0.1))
    model.base_model.model.activation_checkpointing_enable()
    lean = copy.deepcopy(model)
    assert use_lean_layers(lean) == LAYERS * 3 + 1
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    model.train(), lean.train()
    torch.manual_seed(3)  # LoRA dropout draws in the same order: gate's, then up's
    loss, grads = _loss_and_grads(model, ids)
    torch.manual_seed(3)
    lean_loss, lean_grads = _loss_and_grads(lean, ids)
    assert torch.equal(loss, lean_loss) and grads.keys() == lean_grads.keys()
    assert all(torch.equal(grads[name], lean_grads[name]) for name in grads)


def _storages_kept_for_backward(model, ids) -> dict[int, int]:
    """The bytes of each storage (by address) a forward keeps for the backward, parameters aside, as seen by hooks of
    the test's own: the lean MLP leaves its product to them."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    return kept


def _bytes_kept_for_backward(model, ids) -> int:
    return sum(_storages_kept_for_backward(model, ids).values())


def test_each_mlp_no_longer_keeps_its_activation_and_each_norm_its_normalised_input():
    model = _model("llama")
    lean = copy.deepcopy(model)
    use_lean_layers(lean)
    rows, tokens = 3, 20
    ids = torch.randint(0, VOCAB, (rows, tokens), generator=torch.Generator().manual_seed(4))
    # silu(gate(x)) of each layer (FFN wide) and x * rsqrt(...) of each of the 2 * LAYERS + 1 norms, in fp32
    expected_saving = (LAYERS * FFN + (2 * LAYERS + 1) * HIDDEN) * rows * tokens * 4
    assert _bytes_kept_for_backward(model, ids) - _bytes_kept_for_backward(lean, ids) == expected_saving


def _kept_after_forward(model, ids, module_name: str, outputs: bool = False) -> list[bool]:
    """For each module named `module_name` (the last part of its name): whether the tensor it got (its output, with
    `outputs`) is still alive after the forward, i.e. kept for the backward, the loss being the only thing held."""
    refs, handles = [], []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == module_name:
            if outputs:
                handles.append(module.register_forward_hook(lambda m, args, out: refs.append(weakref.ref(out))))
            else:
                handles.append(module.register_forward_pre_hook(lambda m, args: refs.append(weakref.ref(args[0]))))
    loss = model(input_ids=ids, labels=ids).loss
    gc.collect()
    kept = [ref() is not None for ref in refs]
    for handle in handles:
        handle.remove()
    loss.backward()
    return kept


def test_down_proj_keeps_a_recipe_for_its_input_not_the_input():
    """down_proj's input silu(gate) * up is computed again in the backward from the gate and up the MLP keeps anyway:
    it dies with the forward (stock modules keep it), and the gradients stay bitwise those of transformers'."""
    model = _model("llama")
    lean = copy.deepcopy(model)
    use_lean_layers(lean)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(6))
    assert _kept_after_forward(model, ids, "down_proj") == [True] * LAYERS
    assert _kept_after_forward(lean, ids, "down_proj") == [False] * LAYERS
    model.zero_grad(set_to_none=True), lean.zero_grad(set_to_none=True)
    _assert_bitwise(model, lean, ids)


def test_a_lora_down_proj_without_dropout_gets_the_recipe_too():
    # peft freezes the base layer (nothing kept for its weight); lora_A, without dropout, keeps the product itself
    model = get_peft_model(_model("llama"), LoraConfig(r=4, target_modules=["down_proj", "up_proj"], lora_dropout=0.0,
                                                       init_lora_weights=False))
    lean = copy.deepcopy(model)
    use_lean_layers(lean)
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(7))
    assert _kept_after_forward(lean, ids, "down_proj") == [False] * LAYERS
    lean.zero_grad(set_to_none=True)
    _assert_bitwise(model, lean, ids)


class _OffsetViewLinear(torch.nn.Linear):
    """Also keeps a strided view of its input at an offset (a product with a parameter of its own)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = torch.nn.Parameter(torch.tensor([0.5]))

    def forward(self, x):
        return super().forward(x) + x[..., 1:2] * self.scale


def test_a_strided_view_of_the_product_at_an_offset_comes_back_as_that_view():
    model = _model("llama")
    for layer in model.model.layers:
        layer.mlp.down_proj.__class__ = _OffsetViewLinear
        layer.mlp.down_proj.scale = torch.nn.Parameter(torch.tensor([0.5]))
    lean = copy.deepcopy(model)
    use_lean_layers(lean)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(10))
    assert _kept_after_forward(lean, ids, "down_proj") == [False] * LAYERS
    lean.zero_grad(set_to_none=True)
    _assert_bitwise(model, lean, ids)  # the scales' gradients come from the view x[..., 1:2]


def test_two_backwards_of_one_graph_are_bitwise_those_of_transformers_modules():
    model = _model("llama")
    lean = copy.deepcopy(model)
    use_lean_layers(lean)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(11))
    grads = []
    for each in (model, lean):
        loss = each(input_ids=ids, labels=ids).loss
        loss.backward(retain_graph=True)
        loss.backward()  # the product computed again for the second backward
        grads.append({name: p.grad for name, p in each.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(torch.equal(grads[0][name], grads[1][name]) for name in grads[0])


def test_tensors_changed_in_place_before_the_backward_raise_as_autograd_does():
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(12))
    for change in ("down_proj weight", "gate"):
        for lean in (False, True):
            model = _model("llama")
            if lean:
                use_lean_layers(model)
            mlp = model.model.layers[0].mlp
            gates: list[torch.Tensor] = []
            mlp.gate_proj.register_forward_hook(lambda module, args, out, gates=gates: gates.append(out))
            loss = model(input_ids=ids, labels=ids).loss
            with torch.no_grad():
                (mlp.down_proj.weight if change == "down_proj weight" else gates[0]).add_(0)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()


def test_without_torchs_word_on_other_hooks_the_product_is_kept(monkeypatch):
    model = _model("llama")
    lean = copy.deepcopy(model)
    use_lean_layers(lean)
    monkeypatch.delattr(torch._C._autograd, "_top_saved_tensors_default_hooks")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(13))
    assert _kept_after_forward(lean, ids, "down_proj") == [True] * LAYERS
    lean.zero_grad(set_to_none=True)
    _assert_bitwise(model, lean, ids)


class _TanhLinear(torch.nn.Linear):
    def forward(self, x):
        return torch.tanh(super().forward(x))  # tanh keeps its own output for its backward


def test_an_output_kept_by_its_own_op_inside_down_proj_is_freed_with_the_graph():
    """Kept as it is, the output would hold the node that holds it: a graph dropped without a backward (an evaluation
    forward with gradients on, a step skipped) would stay until the garbage collector found the cycle."""
    model = _model("llama")
    for layer in model.model.layers:
        layer.mlp.down_proj.__class__ = _TanhLinear
    use_lean_layers(model)
    outputs = []
    for layer in model.model.layers:
        layer.mlp.down_proj.register_forward_hook(lambda m, args, out: outputs.append(weakref.ref(out)))
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(14))
    gc.collect()
    gc.disable()
    try:
        loss = model(input_ids=ids, labels=ids).loss
        assert loss.requires_grad and len(outputs) == LAYERS
        del loss
        assert all(ref() is None for ref in outputs)
    finally:
        gc.enable()


class _DoublingLinear(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x.mul_(2))  # changes its input in place before the linear saves it


def test_a_product_changed_in_place_before_it_is_saved_is_kept_as_it_is():
    model = _model("llama")
    for layer in model.model.layers:
        layer.mlp.down_proj.__class__ = _DoublingLinear
    lean = copy.deepcopy(model)
    use_lean_layers(lean)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(8))
    _assert_bitwise(model, lean, ids)  # a recipe would give the product before the doubling: other gradients


def test_under_checkpointing_or_offloading_the_mlp_leaves_its_tensors_to_those_hooks():
    """Non-reentrant checkpointing keeps none of a layer's tensors: a recipe would keep gate and up alive.
    Offloading (torch's save_on_cpu, or any saved-tensor hooks already active) gets the product as a tensor. Where
    hooks are switched off, the MLP adds none."""
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(9))
    model = _model("llama")
    model.activation_checkpointing_enable()  # non-reentrant by default
    model.train()
    lean = copy.deepcopy(model)
    use_lean_layers(lean)
    assert _kept_after_forward(lean, ids, "gate_proj", outputs=True) == [False] * LAYERS
    assert _kept_after_forward(lean, ids, "up_proj", outputs=True) == [False] * LAYERS
    model.zero_grad(set_to_none=True), lean.zero_grad(set_to_none=True)
    _assert_bitwise(model, lean, ids)

    stock, lean = _model("llama"), _model("llama")
    use_lean_layers(lean)
    for each in (stock, lean):
        kept = _storages_kept_for_backward(each, ids).values()
        products = [n for n in kept if n == 2 * 10 * FFN * 4]  # [2, 10, FFN] fp32: gate, up, silu, product
        assert len(products) == (4 if each is stock else 3) * LAYERS  # the lean MLP keeps no silu(gate)

    # hooks switched off (as functorch's transforms do): adding some would raise; the MLP adds none
    stock.zero_grad(set_to_none=True), lean.zero_grad(set_to_none=True)
    with torch.autograd.graph.disable_saved_tensors_hooks("no hooks here"):
        _assert_bitwise(stock, lean, ids)


class _ScaledMLP(LlamaMLP):
    def forward(self, x):
        return 2 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_modules_that_compute_anything_else_keep_their_own_forward(monkeypatch):
    gelu = _model("llama", hidden_act="gelu")  # the MLP's forward, another activation: only the norms
    assert use_lean_layers(gelu) == 2 * LAYERS + 1
    assert all(type(layer.mlp) is LlamaMLP for layer in gelu.model.layers)
    scaled = _model("llama")
    for layer in scaled.model.layers:
        layer.mlp.__class__ = _ScaledMLP
    assert use_lean_layers(scaled) == 2 * LAYERS + 1
    assert all(type(layer.mlp) is _ScaledMLP for layer in scaled.model.layers)
    assert use_lean_layers(_model("gpt2", n_embd=HIDDEN, n_layer=LAYERS, n_head=4)) == 0
    monkeypatch.setenv("POSTTRAIN_LEAN_LAYERS", "0")
    assert use_lean_layers(_model("llama")) == 0


def test_a_pickled_or_copied_model_keeps_its_lean_layers():
    model = _model("llama")
    use_lean_layers(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # a whole module: pickled (the class made for it cannot be found by name)
    buffer.seek(0)
    for other in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert [type(m) for m in other.modules()] == [type(m) for m in model.modules()]
        assert use_lean_layers(other) == 0
        ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
        _assert_bitwise(model, other, ids)
        model.zero_grad(set_to_none=True)
