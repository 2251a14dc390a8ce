"""Attention over a padding-free RL batch's prompt copies and completions only (`models.prefix_attention`): the
same logprobs, values and gradients as the dense block mask, in float64, wherever the tree is taken; the
dense mask wherever it is not."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

from posttrain.models import cpu_attention, prefix_attention
from posttrain.models.cpu_attention import ATTENTION, use_cpu_attention
from posttrain.models.prefix_attention import PrefixTree, length_buckets
from posttrain.models.value import ActorCritic
from posttrain.recipes.rl_loop import rollout_forward, split_by_tokens
from posttrain.rollout import Rollout
from posttrain.rollout.recompute import PaddingFree, pack_rollout, packed_logprobs_and_entropy

# Three prompts of 5, 2 and 7 tokens with 3, 1 and 4 completions of ragged lengths (one of a single token).
GROUPS = [(5, [4, 1, 6]), (2, [3]), (7, [2, 5, 5, 3])]


def grouped_rollout(vocab: int, eos: int) -> Rollout:
    generator = torch.Generator().manual_seed(0)
    rows = [(prompt, completion) for prompt, completions in GROUPS for completion in completions]
    longest_prompt, longest_completion = max(p for p, _ in rows), max(c for _, c in rows)
    prompts = [torch.randint(0, vocab, (p,), generator=generator) for p, _ in GROUPS]
    prompt_ids = torch.randint(0, vocab, (len(rows), longest_prompt), generator=generator)  # garbage in the padding
    completion_ids = torch.randint(0, vocab, (len(rows), longest_completion), generator=generator)
    completion_ids[completion_ids == eos] = eos - 1
    prompt_mask, response_mask = torch.zeros_like(prompt_ids), torch.zeros_like(completion_ids)
    index = [g for g, (_, completions) in enumerate(GROUPS) for _ in completions]
    for i, ((prompt, completion), group) in enumerate(zip(rows, index, strict=True)):
        prompt_ids[i, longest_prompt - prompt:] = prompts[group]
        prompt_mask[i, longest_prompt - prompt:] = 1
        response_mask[i, :completion] = 1
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                   response_mask=response_mask, logprobs=torch.zeros(completion_ids.shape),
                   finish_reasons=["length"] * len(rows), texts=[""] * len(rows),
                   prompt_index=torch.tensor(index), temperature=0.9)


def float64_model(vocab: int, kind=AutoModelForCausalLM, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    settings = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64) | config
    model = kind.from_config(LlamaConfig(**settings), attn_implementation="sdpa").double()
    assert use_cpu_attention(model) == 1 and model.config._attn_implementation == ATTENTION
    return model


@pytest.fixture
def tree_calls(monkeypatch):
    """How many attention calls went through the tree."""
    calls = []
    original = prefix_attention.prefix_tree_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(prefix_attention, "prefix_tree_attention", counted)
    return calls


@pytest.fixture
def narrow_rows_take_the_tree(monkeypatch):
    """Rows of samples or shared prompts take the tree at any width (the tests' rows are a few tokens wide; by default
    rows up to `SAMPLE_TREE_MIN_WIDTH` keep the dense mask)."""
    monkeypatch.setattr(cpu_attention, "SAMPLE_TREE_MIN_WIDTH", 0)


def prompt_copies(packed) -> int:
    return sum(len(call.queries) for call in packed.tree().calls if call.keys is None)


def outputs_and_gradients(out: torch.Tensor, model: torch.nn.Module) -> tuple[torch.Tensor, dict]:
    """`out` and every parameter's gradient of a weighted sum of it (weights 0.5 to 1.5: each output counts)."""
    (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def assert_same_outputs_and_gradients(got, grads, expected, expected_grads) -> None:
    """Equal in float64 up to rounding: the outputs, and the gradients of the same (more than ten) parameters."""
    assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert grads.keys() == expected_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def without_tree(monkeypatch):
    monkeypatch.setattr(prefix_attention, "applies", lambda *_: False)


@pytest.mark.parametrize("share", [True, False], ids=["shared-prompts", "a-prompt-per-sample"])
@pytest.mark.parametrize("capacity", [None, 12, 1000], ids=["one-row", "rows-of-12", "rows-of-1000"])
def test_logprobs_and_gradients_through_the_tree_equal_the_dense_masks(tokenizer, monkeypatch, tree_calls, share,
                                                                       capacity):
    model = float64_model(len(tokenizer))
    rollout = grouped_rollout(len(tokenizer), tokenizer.eos_token_id)
    results = []
    for use_tree in (True, False):
        if not use_tree:
            without_tree(monkeypatch)
        model.zero_grad()
        logprobs, _ = packed_logprobs_and_entropy(model, rollout, capacity=capacity, share_prompts=share)
        (logprobs * torch.linspace(0.5, 1.5, logprobs.numel(), dtype=torch.float64).view_as(logprobs)).sum().backward()
        results.append((logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        if use_tree:
            assert len(tree_calls) == model.config.num_hidden_layers  # every layer took the tree
    (tree_logprobs, tree_grads), (dense_logprobs, dense_grads) = results
    assert_close(tree_logprobs, dense_logprobs, rtol=0, atol=1e-12)
    assert (tree_logprobs[rollout.response_mask == 0] == 0).all()
    for name, grad in dense_grads.items():
        assert grad.abs().max() > 0, name
        assert_close(tree_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_the_actor_critic_forward_passes_the_tree_to_actor_and_critic(tokenizer, monkeypatch, tree_calls):
    """PPO's separate critic is a model of its own: its trunk takes the tree too, and its values are the dense ones."""
    vocab = len(tokenizer)
    critic = float64_model(vocab, AutoModelForSequenceClassification, num_hidden_layers=3, num_labels=1)
    policy = ActorCritic(float64_model(vocab), critic, values=True)
    rollout = grouped_rollout(vocab, tokenizer.eos_token_id)
    layout = PaddingFree(capacity=16, share_prompts=True)
    logprobs, _, values = rollout_forward(policy, rollout, padding_free=layout)
    assert len(tree_calls) == 2 + 3
    without_tree(monkeypatch)
    dense_logprobs, _, dense_values = rollout_forward(policy, rollout, padding_free=layout)
    assert_close(logprobs, dense_logprobs, rtol=0, atol=1e-12)
    assert_close(values, dense_values, rtol=0, atol=1e-12)


def test_a_sliding_window_layer_uses_the_dense_mask(tokenizer, tree_calls):
    """Mistral's layers pass their window to the attention function: the tree knows nothing of windows, so the
    dense mask (which has the window cut in) computes it."""
    from transformers import MistralConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4), attn_implementation="sdpa").double()
    use_cpu_attention(model)
    rollout = grouped_rollout(len(tokenizer), tokenizer.eos_token_id)
    packed_logprobs_and_entropy(model, rollout, share_prompts=True)
    assert tree_calls == []


def test_the_tree_of_packed_rows_indexes_each_prompt_copy_and_completion():
    """Two rows of 8: row 0 holds a prompt of 2 with completions of 3 and 1; row 1 a prompt of 3 with one of 2, a
    single causal sequence of 5. The completion of 1 token is less than half the longest (3): a call of its own,
    not padded to 3."""
    tree = PrefixTree.of_rows(8, [[(0, 2, [(2, 3), (5, 1)])], [(0, 3, [(3, 2)])]])
    alone, prompts, long_completion, short_completion = tree.calls
    assert alone.queries.tolist() == [[8, 9, 10, 11, 12]] and alone.keys is None  # causal over itself
    assert prompts.queries.tolist() == [[0, 1]] and prompts.keys is None
    assert long_completion.queries.tolist() == [[2, 3, 4]] and long_completion.keys.tolist() == [[0, 1, 2, 3, 4]]
    seen = (long_completion.mask[0, 0] == 0).int().tolist()  # additive: 0 where seen
    assert seen == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert short_completion.queries.tolist() == [[5]] and short_completion.keys.tolist() == [[0, 1, 5]]
    assert (short_completion.mask == 0).all()
    # Every real token goes back exactly once from its place in the calls' outputs; padding slots get nothing.
    computed = torch.arange(sum(call.queries.numel() for call in tree.calls))
    assert dict(zip(tree.targets.tolist(), computed[tree.sources].tolist(), strict=True)) == {
        8: 0, 9: 1, 10: 2, 11: 3, 12: 4, 0: 5, 1: 6, 2: 7, 3: 8, 4: 9, 5: 10}
    padded = PrefixTree.of_rows(8, [[(0, 2, [(2, 3)]), (5, 1, [(6, 1)])]])  # two sequences of 5 and 2 tokens
    assert [call.queries.tolist() for call in padded.calls] == [[[0, 1, 2, 3, 4]], [[5, 6]]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_gathers_gradient_sums_every_calls_as_separate_index_selects_do(dtype):
    """A layer's gathers for all of a tree's calls in one function: the gathered rows of each call, and one gradient
    that sums what every call sent back (rows gathered by several calls, or twice by one), against a hand sum in
    float64. A call whose gathers get no gradient adds nothing."""
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(7, 2, 3, generator=generator, dtype=torch.float64).to(dtype)
    indices = [torch.tensor([0, 1, 2, 2]), torch.tensor([2, 3, 6]), torch.tensor([5, 0]), torch.tensor([4])]
    grads = [torch.randn(len(index), 2, 3, generator=generator, dtype=torch.float64).to(dtype).transpose(1, 2)
             .contiguous().transpose(1, 2) for index in indices]  # strided, as an attention's gradients come back
    used = [0, 1, 2]  # the last call's rows get no gradient
    together = states.clone().requires_grad_()
    gathered = prefix_attention._GatherRows.apply(together, *indices)
    for g, index in zip(gathered, indices, strict=True):
        assert torch.equal(g, states.index_select(0, index))
    torch.autograd.backward([gathered[i] for i in used], [grads[i] for i in used])
    # the reference, by hand in float64: each used call's gradient rows added to the rows they came from
    expected = torch.zeros(7, 2, 3, dtype=torch.float64)
    for i in used:
        for row, grad in zip(indices[i].tolist(), grads[i].double(), strict=True):
            expected[row] += grad
    assert together.grad.dtype == dtype
    # float64: exact up to the order of the additions; bf16: each of a row's at most three additions rounds once
    atol = 1e-14 if dtype == torch.float64 else 3 * torch.finfo(dtype).eps * expected.abs().max().item()
    assert_close(together.grad.double(), expected, rtol=0, atol=atol)
    with torch.no_grad():  # the no-grad passes (pi_old, reference): the same rows, nothing recorded
        assert all(torch.equal(a, b) for a, b in zip(prefix_attention._GatherRows.apply(states, *indices), gathered,
                                                       strict=True))


def test_length_buckets_keep_each_bucket_within_twice_its_shortest():
    assert length_buckets([3, 40, 1, 17, 33, 0, 2]) == [[1, 4], [3], [0, 6], [2], [5]]  # 40 33 | 17 | 3 2 | 1 | 0
    # 60 completions of 50 tokens and 4 of 1024: padding all 64 to 1024 would attend 13x the pairs needed
    lengths = [50] * 60 + [1024] * 4
    assert sorted(len(b) for b in length_buckets(lengths)) == [4, 60]


def test_pack_rollout_builds_the_tree_of_its_rows(tokenizer):
    rollout = grouped_rollout(len(tokenizer), tokenizer.eos_token_id)
    packed = pack_rollout(rollout, capacity=None, share_prompts=True)
    tree = packed.tree()
    assert (tree.rows, tree.width) == tuple(packed.input_ids.shape)
    # Every real token of the row goes back once, and the prompt copies are the calls without keys, one per group.
    assert sorted(tree.targets.tolist()) == list(range(packed.input_ids.numel()))
    flat = packed.input_ids.flatten()
    # Each prompt laid out once: as a copy its completions attend to, or (one completion) at the head of a sequence.
    heads = [row for call in tree.calls if call.keys is None for row in call.queries]
    prompts = [tuple(ids[keep].tolist()) for ids, keep in zip(rollout.prompt_ids, rollout.prompt_mask.bool(),
                                                                strict=True)]
    assert len(heads) == len(GROUPS)
    assert {next(p for p in prompts if tuple(flat[row[:len(p)]].tolist()) == p) for row in heads} == set(prompts)


def test_whole_groups_get_no_dense_mask_and_a_layer_that_cannot_take_the_tree_refuses(tokenizer, monkeypatch):
    """Groups kept whole (rows as wide as a prompt and all its completions) get no R x W^2 mask; their logprobs are
    those of groups cut to the capacity under the dense mask; a layer that could not compute from the tree would
    be left with no mask at all, and stops instead."""
    model = float64_model(len(tokenizer))
    rollout = grouped_rollout(len(tokenizer), tokenizer.eos_token_id)
    packed = pack_rollout(rollout, capacity=4, share_prompts=True, whole_groups=True)
    mask = packed.attention_mask
    assert mask.untyped_storage().nbytes() == mask.element_size() and mask.shape[2:] == packed.input_ids.shape[1:] * 2
    assert prompt_copies(packed) == len(GROUPS)  # one copy of each prompt: nothing cut at 4 tokens
    tokens = sum(prompt + sum(completions) for prompt, completions in GROUPS)
    assert packed.input_ids.shape == (1, tokens)  # side by side in one row: no padding
    whole, _ = packed_logprobs_and_entropy(model, rollout, capacity=4, share_prompts=True, whole_groups=True)
    cut, _ = packed_logprobs_and_entropy(model, rollout, capacity=4, share_prompts=True)
    assert prompt_copies(pack_rollout(rollout, capacity=4, share_prompts=True)) == 8  # a copy each
    assert_close(whole, cut, rtol=0, atol=1e-12)
    without_tree(monkeypatch)
    with pytest.raises(RuntimeError, match="update.share_prompts=false"):
        packed_logprobs_and_entropy(model, rollout, capacity=4, share_prompts=True, whole_groups=True)


def test_a_token_budget_cuts_whole_groups_into_micro_batches_within_it(tokenizer):
    """update.micro_batch_tokens bounds what a micro-batch's forward computes: a group kept whole in its forward is
    still cut between micro-batches where it is larger than the budget (each piece then has its prompt copy)."""
    rollout = grouped_rollout(len(tokenizer), tokenizer.eos_token_id)
    layout = PaddingFree(capacity=256, share_prompts=True, whole_groups=True)  # rows wider than the budget
    pieces = split_by_tokens(torch.arange(len(rollout.finish_reasons)), rollout, 12, layout)
    assert len(pieces) > len(GROUPS) and sorted(torch.cat(pieces).tolist()) == list(range(8))
    for piece in pieces:
        packed = pack_rollout(rollout.select(piece), 256, share_prompts=True, whole_groups=True)
        assert packed.input_ids.numel() <= 12


def test_latent_attention_whose_values_are_narrower_than_its_keys_takes_the_tree(tokenizer, monkeypatch, tree_calls):
    """DeepSeek-V3's multi-head latent attention: queries and keys of 12 dims per head, values of 6."""
    from transformers import DeepseekV3Config

    torch.manual_seed(0)
    config = DeepseekV3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
                              kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                              n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=2)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").double()
    use_cpu_attention(model)
    rollout = grouped_rollout(len(tokenizer), tokenizer.eos_token_id)
    logprobs, _ = packed_logprobs_and_entropy(model, rollout, share_prompts=True)
    assert len(tree_calls) == 2
    without_tree(monkeypatch)
    dense, _ = packed_logprobs_and_entropy(model, rollout, share_prompts=True)
    assert_close(logprobs, dense, rtol=0, atol=1e-12)


# Packed rows of whole samples (data.collate.collate_packed), lengths per row: ragged, a one-token sample, two
# neighbours given one id (collate_packed gives each its own; a sample still starts at position 0), a row of one.
SAMPLE_ROWS = [[9, 3, 1, 14], [1, 7, 7], [20]]


def packed_samples(vocab: int) -> dict:
    from posttrain.data.collate import collate_packed

    generator = torch.Generator().manual_seed(1)
    rows = [[{"input_ids": torch.randint(1, vocab, (n,), generator=generator).tolist(),
              "response_mask": [0] * (n // 2) + [1] * (n - n // 2)} for n in row] for row in SAMPLE_ROWS]
    indices = [[0, 1, 2, 3], [4, 5, 5], [6]]
    return collate_packed(rows, pad_token_id=0, mask_dtype=torch.float64, indices=indices)


@pytest.mark.parametrize("kind", ["causal-lm", "reward-model"])
def test_packed_samples_through_the_tree_equal_the_block_causal_mask(tokenizer, monkeypatch, tree_calls, kind,
                                                                      narrow_rows_take_the_tree):
    """SFT/DPO/RM padding-free and packed batches: each sample causally over itself through the tree gives the
    block-causal mask's logprobs (or rewards) and gradients."""
    from posttrain.models.likelihood import response_logprobs
    from posttrain.models.reward import sequence_scores

    vocab = len(tokenizer)
    batch = packed_samples(vocab)

    def run():
        if kind == "causal-lm":
            model = float64_model(vocab)
            logprobs, mask = response_logprobs(model, batch)
            out = logprobs * mask
        else:
            model = float64_model(vocab, AutoModelForSequenceClassification, num_labels=1, pad_token_id=0)
            out = sequence_scores(model, batch)
        return outputs_and_gradients(out, model)

    through_tree, tree_grads = run()
    assert len(tree_calls) == 2  # both layers
    without_tree(monkeypatch)
    dense, dense_grads = run()
    assert len(tree_calls) == 2
    assert_same_outputs_and_gradients(through_tree, tree_grads, dense, dense_grads)


def test_the_tree_of_packed_samples_has_a_causal_call_per_sample():
    batch = packed_samples(50)
    tree = PrefixTree.of_samples(batch["sample_ids"], batch["position_ids"])
    width = batch["input_ids"].shape[1]
    assert (tree.rows, tree.width) == (3, width)
    starts = sorted(int(queries[0]) for call in tree.calls for queries in call.queries)
    assert all(call.keys is None and call.mask is None for call in tree.calls)
    assert starts == [0, 9, 12, 13, width, width + 1, width + 8, 2 * width]  # a query row per sample, none of padding
    assert sorted(tree.targets.tolist()) == [r * width + c for r, row in enumerate(SAMPLE_ROWS)
                                             for c in range(sum(row))]


def test_only_packed_batches_with_a_block_causal_mask_get_the_sample_tree(tokenizer, narrow_rows_take_the_tree):
    from posttrain.data.collate import collate_packed, collate_padded
    from posttrain.models.cpu_attention import sample_tree_keywords

    model = float64_model(len(tokenizer))
    batch = packed_samples(len(tokenizer))
    assert set(sample_tree_keywords(model, batch)) == {prefix_attention.KEYWORD}
    samples = [{"input_ids": [5, 6, 7], "response_mask": [0, 1, 1]}, {"input_ids": [8, 9], "response_mask": [0, 1]}]
    assert sample_tree_keywords(model, collate_padded(samples, 0)) == {}  # one sample per row: its 2-D mask
    # mask-free packed rows (for kernels that read position_ids): the caller asked for no mask, gets no tree
    assert sample_tree_keywords(model, collate_packed([samples], 0, attention="position_ids")) == {}


def test_packed_samples_through_the_tree_under_bf16_autocast_with_the_matmul_kernel(tokenizer, monkeypatch,
                                                                                   tree_calls,
                                                                                   narrow_rows_take_the_tree):
    """The kernels the tree's calls take under CPU bf16 autocast (here the GEMM one, fixed): the block-causal mask's
    logprobs up to bf16 rounding."""
    from posttrain.models import matmul_attention
    from posttrain.models.likelihood import response_logprobs
    from posttrain.models.precision import autocast

    monkeypatch.setenv("POSTTRAIN_CPU_ATTENTION", "matmul")
    gemm_calls = []
    real = matmul_attention.attention
    monkeypatch.setattr(matmul_attention, "attention", lambda *args, **kwargs: gemm_calls.append(1) or real(
        *args, **kwargs))
    vocab = len(tokenizer)
    batch = {k: v.float() if k == "attention_mask" else v for k, v in packed_samples(vocab).items()}
    # weights large enough for attention to move the logprobs well beyond bf16's rounding
    model = float64_model(vocab, initializer_range=0.5).float()

    def logprobs(rows=batch):
        with torch.no_grad(), autocast("bf16"):
            values, mask = response_logprobs(model, rows)
        return values[mask.bool()]

    through_tree = logprobs()
    assert len(tree_calls) == 2 and len(gemm_calls) == 2 * 4  # each layer: a call per length bucket of the samples
    without_tree(monkeypatch)
    dense = logprobs()
    assert len(tree_calls) == 2 and len(gemm_calls) == 2 * 4 + 2  # each layer: one call over the rows
    difference = (through_tree - dense).abs().max()
    assert difference < 0.05  # natural-log units; bf16 rounds to 2^-8 relative
    # the control: rows whose samples see each other (one causal block per row) are far from both
    leaking = dict(batch, attention_mask=torch.zeros_like(batch["attention_mask"]).masked_fill(
        ~torch.ones(batch["attention_mask"].shape[-2:], dtype=torch.bool).tril(), torch.finfo(torch.float32).min))
    assert (logprobs(leaking) - dense).abs().max() > 10 * max(difference, 0.01)


def comparisons(vocab: int) -> list[dict]:
    """Preference pairs of random tokens: prompts of 6, 2 and 9 tokens (two pairs share the first), answers of 1-5
    tokens, one pair whose answers open with the same token."""
    generator = torch.Generator().manual_seed(2)

    def tokens(n):
        return torch.randint(1, vocab, (n,), generator=generator).tolist()

    prompts = {6: tokens(6), 2: tokens(2), 9: tokens(9)}
    rows = []
    for prompt, chosen, rejected in [(6, 3, 2), (2, 3, 4), (9, 5, 2), (6, 2, 2)]:
        answers = tokens(chosen), tokens(rejected)
        rows.append({f"{side}_{key}": value for side, answer in zip(("chosen", "rejected"), answers, strict=True)
                     for key, value in (("input_ids", prompts[prompt] + answer),
                                        ("response_mask", [0] * prompt + [1] * len(answer)))})
    rows[1]["rejected_input_ids"][2] = rows[1]["chosen_input_ids"][2]  # shared with the prompt, predicted by it
    return rows


@pytest.mark.parametrize("kind", ["causal-lm", "reward-model"])
@pytest.mark.parametrize("capacity", [0, 12])
def test_shared_prompts_give_the_padded_sequences_logprobs_rewards_and_gradients(tokenizer, monkeypatch, tree_calls,
                                                                                 float64_norms, kind, capacity,
                                                                                 narrow_rows_take_the_tree):
    """DPO's and the reward model's padding-free pairs with each prompt once (`collate_shared_prompts`), through the
    tree and through the dense mask: every sequence's summed logprobs (or reward), its trained-token count and every
    gradient are those of the padded batch, one sequence per row, in float64."""
    from posttrain.data.collate import PackingOptions, collate_pairs
    from posttrain.models.likelihood import per_sequence_sums, response_logprobs
    from posttrain.models.reward import sequence_scores

    vocab = len(tokenizer)
    rows = comparisons(vocab)
    padded = collate_pairs(rows, 0)
    shared = collate_pairs(rows, 0, PackingOptions(mask_dtype=torch.float64, row_capacity=capacity,
                                                    share_prompts=True))
    # each prompt once per piece of its group that fits a row: in one row, the 69 tokens of the eight sequences less
    # three copies of the 6-token prompt (a group of four), one of the 9-token one and one of the 2-token one with its
    # shared answer token; in rows of 12 the group of the 6-token prompt is cut in two pieces (11 and 10 tokens) and
    # the 9-token prompt's answers (14 and 11 tokens with it) each get a row with their own copy
    assert int(padded["attention_mask"].sum()) == 69
    assert int((shared["segment_ids"] >= 0).sum()) == (69 - 3 * 6 - 9 - 3 if capacity == 0 else 69 - 2 * 6 - 3)

    def run(batch):
        if kind == "causal-lm":
            model = float64_model(vocab)
            float64_norms(model)
            logprobs, mask = response_logprobs(model, batch)
            out = torch.cat([per_sequence_sums(logprobs, mask, batch), per_sequence_sums(mask, mask, batch)])
        else:
            model = float64_model(vocab, AutoModelForSequenceClassification, num_labels=1, pad_token_id=0)
            float64_norms(model)
            out = sequence_scores(model, batch)
        return outputs_and_gradients(out, model)

    expected, expected_grads = run(padded)
    assert not tree_calls  # one sequence per row: the 2-D mask
    through_tree, tree_grads = run(shared)
    assert len(tree_calls) == 2  # both layers
    without_tree(monkeypatch)
    dense, dense_grads = run(shared)
    assert len(tree_calls) == 2
    for got, grads in ((through_tree, tree_grads), (dense, dense_grads)):
        assert_same_outputs_and_gradients(got, grads, expected, expected_grads)


def test_the_tree_of_shared_prompts_has_a_causal_call_per_prompt_and_one_for_the_answers_over_them():
    from posttrain.data.collate import PackingOptions, collate_pairs

    rows = comparisons(50)
    batch = collate_pairs(rows, 0, PackingOptions(share_prompts=True))
    tree = PrefixTree.of_segments(batch["segment_ids"], batch["parent_ids"])
    prompts = [call for call in tree.calls if call.keys is None]
    answers = [call for call in tree.calls if call.keys is not None]
    # (padding entries repeat a prompt's first index) the prompts of 6 and 9 tokens, and of 2 with an answer token
    assert sorted(len(set(q.tolist())) for call in prompts for q in call.queries) == [3, 6, 9]
    assert sum(len(call.queries) for call in answers) == 8  # every answer once, over its prompt's one copy
    real = (batch["segment_ids"] >= 0).flatten().nonzero().flatten()
    assert sorted(tree.targets.tolist()) == real.tolist()  # every real token computed once, no padding


def test_rows_of_samples_up_to_the_minimum_width_keep_the_dense_mask(tokenizer):
    """At a few hundred tokens a row's one dense attention call costs less than the tree's calls (measured): packed
    samples and shared prompts take the tree only in rows wider than `SAMPLE_TREE_MIN_WIDTH`."""
    from posttrain.data.collate import collate_packed, collate_shared_prompts
    from posttrain.models.cpu_attention import SAMPLE_TREE_MIN_WIDTH, sample_tree_keywords

    model = float64_model(len(tokenizer))

    def sample(n, first):
        return {"input_ids": [1 + (first + i) % 40 for i in range(n)], "response_mask": [0] * 2 + [1] * (n - 2)}

    for width in (SAMPLE_TREE_MIN_WIDTH, SAMPLE_TREE_MIN_WIDTH + 1):
        halves = [sample(width // 2, 0), sample(width - width // 2, 7)]  # other prompts: laid out whole
        for batch in (collate_packed([halves], 0), collate_shared_prompts(halves, 0)):
            assert batch["input_ids"].shape[1] == width
            assert set(sample_tree_keywords(model, batch)) == (set() if width == SAMPLE_TREE_MIN_WIDTH
                                                               else {prefix_attention.KEYWORD})
