"""The batches are right for a real model: packing, padding-free and padding side change nothing.

Per-sample losses of packed and padding-free batches equal those of plain padded batches, and per-token
logprobs do not depend on the padding side (fp32, tiny random Llama with SDPA attention on CPU).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from posttrain.data import DataConfig, collate_packed, collate_padded, pack_bfd, prepare_data

PAD_FREE_MODES = ["packed-mask", "padding-free-mask", "packed-position-ids"]


@pytest.fixture(scope="module")
def samples(tokenizer, tmp_path_factory):
    """12 arith chats of different lengths (few-shot prompts: 0-6 solved lines)."""
    cfg = DataConfig(source="arith", size=12, seed=3, max_length=128,
                     cache_dir=str(tmp_path_factory.mktemp("cache")))
    dataset = prepare_data(cfg, tokenizer, accepts=("messages",)).dataset
    rows = [dataset[i] for i in range(len(dataset))]
    assert len({len(r["input_ids"]) for r in rows}) > 4
    return rows


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor, count: int) -> torch.Tensor:
    """Mean next-token NLL over each sample's trained tokens, grouped by the sample of the target."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    trained = targets != -100
    nll = -logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[trained]
    groups = sample_ids[:, 1:][trained]
    totals = torch.zeros(count).index_add(0, groups, nll)
    return totals / torch.zeros(count).index_add(0, groups, torch.ones_like(nll))


@torch.no_grad()
def test_packing_and_padding_free_give_the_padded_per_sample_loss(samples, tiny_model, tokenizer):
    tiny_model.eval()
    pad = tokenizer.pad_token_id
    padded = collate_padded(samples, pad)
    logits = tiny_model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                        position_ids=padded["position_ids"]).logits
    rows = torch.arange(len(samples))[:, None].expand_as(padded["labels"])
    expected = per_sample_loss(logits, padded["labels"], rows, len(samples))

    bins = pack_bfd([len(s["input_ids"]) for s in samples], capacity=128)
    assert len(bins) < len(samples)  # some rows really hold several samples
    order = torch.tensor([i for b in bins for i in b])
    cases = {
        "packed-mask": collate_packed([[samples[i] for i in b] for b in bins], pad),
        "padding-free-mask": collate_packed([samples], pad),
        "packed-position-ids": collate_packed([[samples[i] for i in b] for b in bins], pad, attention="position_ids"),
    }
    for name, batch in cases.items():
        # Without a mask, transformers derives the blocks from position_ids only when no cache is built.
        kwargs = {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {"use_cache": False}
        logits = tiny_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **kwargs).logits
        got = per_sample_loss(logits, batch["labels"], batch["sample_ids"].clamp(min=0), len(samples))
        if name != "padding-free-mask":
            got = torch.empty_like(got).index_copy_(0, order, got)
        torch.testing.assert_close(got, expected, msg=lambda m, name=name: f"{name}: {m}")


@torch.no_grad()
def test_padding_side_does_not_change_per_token_logprobs(samples, tiny_model, tokenizer):
    tiny_model.eval()
    logprobs = {}
    for side in ("right", "left"):
        batch = collate_padded(samples, tokenizer.pad_token_id, side=side)
        logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            position_ids=batch["position_ids"]).logits.float()
        token_logprobs = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        real = batch["attention_mask"][:, 1:].bool() & batch["attention_mask"][:, :-1].bool()
        logprobs[side] = [row[mask] for row, mask in zip(token_logprobs, real, strict=True)]
        assert torch.isfinite(logits[batch["attention_mask"].bool()]).all()
    for right, left in zip(logprobs["right"], logprobs["left"], strict=True):
        torch.testing.assert_close(left, right, rtol=0, atol=1e-5)


def test_prepare_data_packed_mode_feeds_the_model(samples, tiny_model, tokenizer, tmp_path):
    cfg = DataConfig(source="arith", size=24, max_length=128, batch_mode="packed", cache_dir=str(tmp_path))
    prepared = prepare_data(cfg, tokenizer, accepts=("messages",))
    assert len(prepared.dataset) < prepared.tokenized.stats.kept
    batch = prepared.collator([prepared.dataset[i] for i in range(2)])
    out = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], labels=batch["labels"])
    assert torch.isfinite(out.loss)
    padded = dataclasses.replace(cfg, batch_mode="padded")
    assert prepare_data(padded, tokenizer, accepts=("messages",)).tokenized.stats == prepared.tokenized.stats


def test_padding_free_rows_capped_at_a_capacity_give_the_padded_loss(tiny_model, tokenizer, tmp_path):
    from posttrain.recipes.sft import sft_loss_fn

    cfg = DataConfig(source="arith", size=12, max_length=128, batch_mode="padding_free", padding_free_capacity=96,
                     cache_dir=str(tmp_path))
    losses, layouts = {}, {}
    model = tiny_model.double()
    for name, variant in (("padded", dataclasses.replace(cfg, batch_mode="padded")), ("capped", cfg),
                          ("one_row", dataclasses.replace(cfg, padding_free_capacity=0))):
        # float64 throughout (the block masks too), so that only the layout differs between the three
        prepared = prepare_data(variant, tokenizer, accepts=("messages",), mask_dtype=torch.float64)
        rows = [prepared.dataset[i] for i in range(len(prepared.dataset))]
        batch = prepared.collator(rows)
        trained = int(batch["labels"].ne(-100).sum()) if name == "padded" else None
        losses[name] = sft_loss_fn(model, batch, float(trained or losses["trained"]))[0]
        losses.setdefault("trained", trained)
        layouts[name] = batch
    lengths = sorted(len(r["input_ids"]) for r in rows)
    capped = layouts["capped"]
    assert layouts["one_row"]["input_ids"].shape == (1, sum(lengths))
    assert capped["input_ids"].shape[0] > 1 and capped["input_ids"].shape[1] <= 96
    # every sample exactly once, each whole inside one row (its ids contiguous, positions restarting at 0)
    real = capped["sample_ids"][capped["sample_ids"] >= 0]
    assert sorted(real.bincount().tolist()) == lengths
    assert int(capped["position_ids"].eq(0).logical_and(capped["sample_ids"] >= 0).sum()) == len(lengths)
    torch.testing.assert_close(losses["capped"], losses["padded"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(losses["one_row"], losses["padded"], rtol=1e-10, atol=1e-12)
