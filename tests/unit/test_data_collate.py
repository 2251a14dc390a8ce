"""Collators and best-fit-decreasing packing (the model-level equalities are in tests/integration)."""

from __future__ import annotations

import random

import pytest
import torch

from posttrain.data import (
    Collator,
    collate_packed,
    collate_padded,
    collate_pairs,
    collate_prompts,
    collate_rankings,
    collate_stepwise,
    pack_bfd,
    ranking_matrix,
)
from posttrain.data.collate import block_causal_mask, capped_rows, pack_dataset, unpack_row

PAD = 0
A = {"input_ids": [1, 5, 6, 7, 2], "response_mask": [0, 0, 1, 1, 1]}
B = {"input_ids": [1, 8, 2], "response_mask": [0, 1, 1]}


def test_pack_bfd_hand_example():
    # Decreasing: 6, 5, 4, 3, 2 into bins of 8: 6 -> new; 5 -> new; 4 -> new; 3 best fits the 5 (3 left
    # -> 0); 2 best fits the 6 (2 left -> 0).
    assert pack_bfd([3, 6, 2, 5, 4], capacity=8) == [[1, 2], [3, 0], [4]]


def test_pack_bfd_properties_on_random_lengths():
    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(500)]
    bins = pack_bfd(lengths, capacity=64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= 1.25 * sum(lengths) / 64 + 1  # BFD is within 11/9 OPT + 1 of the optimum


def test_pack_bfd_rejects_a_sample_longer_than_capacity():
    with pytest.raises(ValueError, match="more than the packing capacity"):
        pack_bfd([3, 9], capacity=8)


def test_padded_right_and_left():
    right = collate_padded([A, B], PAD)
    assert right["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 8, 2, PAD, PAD]]
    assert right["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert right["labels"].tolist() == [[-100, -100, 6, 7, 2], [-100, 8, 2, -100, -100]]
    assert torch.equal(right["response_mask"], (right["labels"] != -100).long())
    left = collate_padded([A, B], PAD, side="left")
    assert left["input_ids"].tolist() == [[1, 5, 6, 7, 2], [PAD, PAD, 1, 8, 2]]
    assert left["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    assert left["labels"][1].tolist() == [-100, -100, -100, 8, 2]


def test_packed_row_restarts_positions_and_blocks_attention():
    batch = collate_packed([[A, B], [B]], PAD)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2, 1, 8, 2], [1, 8, 2] + [PAD] * 5]
    # Padding stays at position 0: counted on, a wide row's padding could pass a learned position table (GPT-2's).
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 0, 0, 0, 0, 0]]
    assert batch["sample_ids"].tolist() == [[0] * 5 + [1] * 3, [2] * 3 + [-1] * 5]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7, 2, -100, 8, 2], [-100, 8, 2] + [-100] * 5]
    allowed = batch["attention_mask"][0, 0] == 0
    assert allowed[6].tolist() == [False] * 5 + [True, True, False]  # B's 2nd token sees only B
    assert allowed[4].tolist() == [True] * 5 + [False] * 3
    assert "attention_mask" not in collate_packed([[A, B]], PAD, attention="position_ids")


def test_block_causal_mask_dtype():
    mask = block_causal_mask(torch.tensor([[0, 0, 1]]), torch.bfloat16)
    assert mask.shape == (1, 1, 3, 3) and mask.dtype == torch.bfloat16
    assert mask[0, 0, 1, 0] == 0 and mask[0, 0, 2, 1] == torch.finfo(torch.bfloat16).min


def test_padding_free_is_one_row():
    batch = Collator("messages", PAD, batch_mode="padding_free")([A, B, B])
    assert batch["input_ids"].shape == (1, 11)
    assert batch["sample_ids"].tolist() == [[0] * 5 + [1] * 3 + [2] * 3]


def test_pack_dataset_round_trip():
    from datasets import Dataset

    samples = [A, B, B, A]
    dataset = Dataset.from_list([s | {"length": len(s["input_ids"])} for s in samples])
    packed = pack_dataset(dataset, capacity=8)
    rows = [unpack_row(packed[i]) for i in range(len(packed))]
    assert sorted(len(r) for r in rows) == [2, 2]
    assert sorted(str(s) for r in rows for s in r) == sorted(str(s) for s in samples)
    batch = Collator("completion", PAD, batch_mode="packed")([packed[i] for i in range(len(packed))])
    assert batch["input_ids"].shape == (2, 8)


def test_pairs_rankings_stepwise_prompts():
    pair = {"chosen_input_ids": A["input_ids"], "chosen_response_mask": A["response_mask"],
            "rejected_input_ids": B["input_ids"], "rejected_response_mask": B["response_mask"], "margin": None}
    batch = collate_pairs([pair, pair | {"margin": 2.0}], PAD)
    assert batch["input_ids"].shape == (4, 5) and batch["margin"].tolist() == [0.0, 2.0]
    assert batch["input_ids"][2].tolist() == [1, 8, 2, PAD, PAD]  # rejected rows follow the chosen ones

    ranking = {"ranked_input_ids": [A["input_ids"], B["input_ids"], B["input_ids"]],
               "ranked_response_mask": [A["response_mask"], B["response_mask"], B["response_mask"]], "scores": None}
    batch = collate_rankings([ranking, ranking | {"ranked_input_ids": ranking["ranked_input_ids"][:2],
                                                  "ranked_response_mask": ranking["ranked_response_mask"][:2],
                                                  "scores": [3.0, 1.0]}], PAD)
    assert batch["ranking_ids"].tolist() == [0, 0, 0, 1, 1] and batch["ranks"].tolist() == [0, 1, 2, 0, 1]
    assert batch["scores"].tolist() == [0.0, -1.0, -2.0, 3.0, 1.0]
    matrix, mask = ranking_matrix(torch.arange(5.0), batch["ranking_ids"], batch["ranks"])
    assert matrix.tolist() == [[0, 1, 2], [3, 4, 0]] and mask.tolist() == [[True] * 3, [True, True, False]]

    step = B | {"step_ends": [1, 2], "step_labels": [1.0, 0.0]}
    batch = collate_stepwise([step, A | {"step_ends": [3], "step_labels": [1.0]}], PAD)
    assert batch["step_ends"].tolist() == [[1, 2], [3, 0]] and batch["step_mask"].tolist() == [[1, 1], [1, 0]]

    prompts = collate_prompts([{"prompt_input_ids": [1, 5, 6], "answer": "4"}, {"prompt_input_ids": [1, 7],
                                                                                  "answer": "9"}], PAD)
    assert prompts["input_ids"].tolist() == [[1, 5, 6], [PAD, 1, 7]] and prompts["answer"] == ["4", "9"]
    assert "labels" not in prompts


def test_packing_is_for_sft_rows_only():
    with pytest.raises(ValueError, match="SFT formats"):
        Collator("preference", PAD, batch_mode="packed")([])


def test_padding_free_rows_are_capped_best_fit_and_a_longer_sample_gets_its_own_row():
    batch = Collator("messages", PAD, batch_mode="padding_free", row_capacity=8)([A, B, B, A])  # lengths 5, 3, 3, 5
    assert batch["input_ids"].shape == (2, 8)  # best fit: 5 + 3 in each row
    assert sorted(batch["sample_ids"][batch["sample_ids"] >= 0].bincount().tolist()) == [3, 3, 5, 5]
    wide = Collator("messages", PAD, batch_mode="padding_free", row_capacity=4)([A, B])
    assert wide["input_ids"].shape == (2, 5)  # A (5 tokens) alone; B in a row of its own


def test_padding_free_rows_take_the_width_that_pads_least_up_to_the_capacity():
    lengths = [100, 90, 60, 50, 40, 30]  # 370 tokens
    # Filling rows of 256: 100 + 90 + 60 and 50 + 40 + 30, padded to 250: 500 slots; of 100: 100 | 90 | 60 + 40 |
    # 50 + 30, 400 slots; of 196: 100 + 90 and 60 + 50 + 40 + 30, padded to 190: 380, the fewest any packing has
    # (two rows need 2 x 190, as no half sums to 185; three 3 x 130; four 4 x 100)
    assert sorted(map(sorted, pack_bfd(lengths, 256))) == [[0, 1, 2], [3, 4, 5]]
    rows = capped_rows(lengths, 256)
    assert sorted(sorted(lengths[i] for i in row) for row in rows) == [[30, 40, 50, 60], [90, 100]]
    assert capped_rows(lengths, 0) == [[0, 1, 2, 3, 4, 5]]  # 0: one row, as asked
    assert capped_rows([300, 20], 256) == [[0], [1]]  # a sample over the capacity: its own row
    assert capped_rows([], 256) == []
    assert capped_rows([5, 3, 3, 5], 8) == [[0, 1], [3, 2]]  # 2 rows of 8 (16 slots) against 4 of 5 (20)
    assert capped_rows([4, 4], 8) == [[0], [1]]  # 8 slots either way: the narrower rows


def test_padding_free_pairs_and_rankings_are_capped_and_keep_every_sequence_id():
    """Sequence i of a comparison batch (chosen ones first) is `sample_ids == i` in whichever row it lands."""
    pair_ab = {"chosen_input_ids": A["input_ids"], "chosen_response_mask": A["response_mask"],
               "rejected_input_ids": B["input_ids"], "rejected_response_mask": B["response_mask"]}
    pair_ba = {"chosen_input_ids": B["input_ids"], "chosen_response_mask": B["response_mask"],
               "rejected_input_ids": A["input_ids"], "rejected_response_mask": A["response_mask"]}
    batch = Collator("preference", PAD, batch_mode="padding_free", row_capacity=8, share_prompts=False)(
        [pair_ab, pair_ba])
    assert batch["input_ids"].shape == (2, 8)  # sequences A, B, B, A (5, 3, 3, 5 tokens): 5 + 3 per row
    expected = [A, B, B, A]  # chosen of pair 0 and 1, then rejected of pair 0 and 1
    for i, sequence in enumerate(expected):
        assert batch["input_ids"][batch["sample_ids"] == i].tolist() == sequence["input_ids"]
        assert batch["position_ids"][batch["sample_ids"] == i].tolist() == list(range(len(sequence["input_ids"])))
    one_row = Collator("preference", PAD, batch_mode="padding_free", share_prompts=False)([pair_ab, pair_ba])
    assert one_row["input_ids"].shape == (1, 16)

    ranking = {"ranked_input_ids": [A["input_ids"], B["input_ids"], A["input_ids"]],
               "ranked_response_mask": [A["response_mask"], B["response_mask"], A["response_mask"]], "scores": None}
    ranked = Collator("ranking", PAD, batch_mode="padding_free", row_capacity=8, share_prompts=False)([ranking])
    assert ranked["input_ids"].shape == (3, 5)  # 5 + 3 and 5 in rows of 8: 16 slots; each alone in rows of 5: 15
    for i, sequence in enumerate((A, B, A)):
        assert ranked["input_ids"][ranked["sample_ids"] == i].tolist() == sequence["input_ids"]
    assert ranked["ranks"].tolist() == [0, 1, 2]


def test_packed_rows_are_built_in_arrow_as_the_obvious_loop_builds_them():
    """Built in Arrow now (the lists of Python ints took ~130 bytes a token): against the loop it replaced, on a
    shuffled and filtered set (an index mapping) of rows of random lengths."""
    import random

    from datasets import Dataset

    from posttrain.data.collate import pack_bfd

    rng = random.Random(0)
    rows = []
    for line in range(300):
        n = rng.randint(1, 40)
        rows.append({"input_ids": [rng.randint(0, 500) for _ in range(n)],
                     "response_mask": [rng.randint(0, 1) for _ in range(n)], "length": n, "line": line})
    dataset = Dataset.from_list(rows).shuffle(seed=3).filter(lambda line: line % 5 != 0, input_columns="line")
    packed = pack_dataset(dataset, capacity=64)
    kept = [dataset[i] for i in range(len(dataset))]
    bins = pack_bfd([r["length"] for r in kept], 64)
    assert packed.to_dict() == {"input_ids": [[t for i in b for t in kept[i]["input_ids"]] for b in bins],
                                "response_mask": [[m for i in b for m in kept[i]["response_mask"]] for b in bins],
                                "seq_lengths": [[len(kept[i]["input_ids"]) for i in b] for b in bins]}


def seen_by(batch: dict, flat_index: int) -> list[tuple[int, int]]:
    """(token, position) of every key the query at `flat_index` (row * W + column) attends to under the batch's
    4-D mask, in column order: the context the model computes that token's state from."""
    width = batch["input_ids"].shape[1]
    row, column = divmod(flat_index, width)
    allowed = batch["attention_mask"][row, 0, column] == 0
    return list(zip(batch["input_ids"][row][allowed].tolist(), batch["position_ids"][row][allowed].tolist(),
                    strict=True))


def check_shared_layout(batch: dict, flat: list[dict]) -> None:
    """Every sequence is whole as its last token sees it, and every trained token j > 0 of it is listed once, as
    token j, predicted by a state that sees exactly its tokens 0..j-1 at positions 0..j-1."""
    for i, sample in enumerate(flat):
        ids = sample["input_ids"]
        assert seen_by(batch, int(batch["sequence_ends"][i])) == list(zip(ids, range(len(ids)), strict=True))
        listed = (batch["target_sequences"] == i).nonzero().flatten().tolist()
        trained = [j for j, t in enumerate(sample["response_mask"]) if t and j > 0]
        assert len(listed) == len(trained)
        for k, j in zip(listed, trained, strict=True):  # laid out in the sequence's order
            assert int(batch["targets"][k]) == ids[j]
            assert seen_by(batch, int(batch["predictors"][k])) == list(zip(ids[:j], range(j), strict=True))


def sequence(prompt: list[int], answer: list[int]) -> dict:
    return {"input_ids": prompt + answer, "response_mask": [0] * len(prompt) + [1] * len(answer)}


def test_shared_prompts_lay_a_prompt_out_once_per_group_of_the_sequences_that_open_with_it():
    from posttrain.data.collate import collate_shared_prompts, prompt_groups

    flat = [sequence([1, 5, 6], [7, 2]),  # pair 0 chosen
            sequence([1, 9], [4, 4, 2]),  # pair 1 chosen
            sequence([1, 5, 6], [8, 3, 2]),  # pair 0 rejected
            sequence([1, 9], [4, 2]),  # pair 1 rejected: its answer's first token is the chosen one's too
            sequence([1, 5, 6], [7, 2])]  # a third answer to pair 0's prompt, equal to its chosen one
    assert prompt_groups(flat) == [[0, 2, 4], [1, 3]]
    batch = collate_shared_prompts(flat, PAD)
    check_shared_layout(batch, flat)
    # prompt [1, 5, 6] once, then [7, 2], [8, 3, 2], [7, 2]; prefix [1, 9, 4] once (the shared answer token too),
    # then [4, 2] and [2]: 3 + 7 + 3 + 3 = 16 tokens in one row, no padding
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2, 8, 3, 2, 7, 2, 1, 9, 4, 4, 2, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 3, 4, 0, 1, 2, 3, 4, 3]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 5, 5, 6]]
    assert batch["parent_ids"].tolist() == [[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4]]
    # the prompt's last token predicts the first answer token of each of its three sequences
    assert (batch["predictors"] == 2).sum() == 3 and (batch["predictors"] == 11).sum() == 2
    assert batch["sequence_ends"].tolist() == [4, 14, 7, 15, 9]


def test_shared_prompts_keep_a_token_of_each_sequence_and_lay_out_alone_what_shares_nothing():
    from posttrain.data.collate import collate_shared_prompts

    flat = [sequence([1, 5], [6]), sequence([1, 5], [6]),  # equal sequences: the prefix stops one short
            {"input_ids": [3], "response_mask": [0]},  # a single token, alone
            {"input_ids": [4, 8, 9], "response_mask": [0, 0, 0]}, {"input_ids": [4, 8, 9], "response_mask": [0, 0, 0]},
            sequence([], [2, 7]), sequence([], [3, 7])]  # all answer, first tokens differ: nothing to share
    batch = collate_shared_prompts(flat, PAD, row_capacity=4)
    check_shared_layout(batch, flat)
    real = batch["segment_ids"] >= 0
    assert int(real.sum()) == (2 + 1 + 1) + 1 + (2 + 1 + 1) + 2 + 2  # [1, 5] + [6] + [6]; [3]; [4, 8] + [9] + [9]; 2; 2
    assert batch["input_ids"].shape[1] == 4  # units of 4, 1, 4, 2, 2 tokens best-fit into rows of 4
    padding = ~real
    assert (batch["input_ids"][padding] == PAD).all() and (batch["parent_ids"][padding] == -1).all()


def test_the_collator_shares_prompts_of_padding_free_comparisons_by_default_and_only_with_a_mask():
    pair = {"chosen_input_ids": [1, 5, 6, 7, 2], "chosen_response_mask": [0, 0, 0, 1, 1],
            "rejected_input_ids": [1, 5, 6, 8, 2], "rejected_response_mask": [0, 0, 0, 1, 1]}
    shared = Collator("preference", PAD, batch_mode="padding_free")([pair, pair])  # the default
    assert shared["input_ids"].shape == (1, 3 + 2 * 4)  # both pairs open with one prompt: a group of four
    check_shared_layout(shared, [sequence([1, 5, 6], [7, 2])] * 2 + [sequence([1, 5, 6], [8, 2])] * 2)
    assert shared["margin"].shape == (2,)
    apart = Collator("preference", PAD, batch_mode="padding_free", share_prompts=False)([pair, pair])
    assert apart["input_ids"].shape == (1, 20) and "predictors" not in apart
    # without a mask (kernels that read position_ids) a tree cannot be said: each sequence whole, as before
    unmasked = Collator("preference", PAD, batch_mode="padding_free", packed_attention="position_ids")([pair])
    assert unmasked["input_ids"].shape == (1, 10) and "attention_mask" not in unmasked


def test_a_group_longer_than_a_row_is_cut_into_pieces_each_with_its_copy_of_the_prompt():
    from posttrain.data.collate import collate_shared_prompts, cut_group

    assert cut_group([3, 4, 5, 6], 5, [2, 3, 4, 1], 10) == [[3, 4], [5, 6]]  # 5 + 2 + 3; 5 + 4 + 1
    assert cut_group([3, 4], 5, [9, 9], 10) == [[3], [4]]  # a piece holds one member at least
    assert cut_group([3, 4], 5, [9, 9], 0) == [[3, 4]]
    prompt = [1, 5, 6, 7]
    flat = [sequence(prompt, [10 + k, 2]) for k in range(5)]
    batch = collate_shared_prompts(flat, PAD, row_capacity=9)
    check_shared_layout(batch, flat)
    assert batch["input_ids"].shape == (3, 8)  # pieces of 4 + 2 + 2 tokens (a third answer would make 10)
    assert (batch["input_ids"][:, :4] == torch.tensor(prompt)).all()  # each piece's copy of the prompt
    assert batch["position_ids"][2].tolist() == [0, 1, 2, 3, 4, 5, 0, 0]  # the last piece's one answer, padding


def test_a_one_token_sequence_is_laid_out_alone_and_the_rest_of_its_group_still_shares():
    from posttrain.data.collate import collate_shared_prompts

    # all trained: one group (no token before the first trained one)
    flat = [{"input_ids": [1], "response_mask": [1]}, {"input_ids": [1, 5, 6, 7], "response_mask": [1, 1, 1, 1]},
            {"input_ids": [1, 5, 6, 9], "response_mask": [1, 1, 1, 1]}]
    batch = collate_shared_prompts(flat, PAD)
    check_shared_layout(batch, flat)
    assert int((batch["segment_ids"] >= 0).sum()) == 1 + 3 + 1 + 1  # [1]; [1, 5, 6] once, then [7] and [9]


def test_kto_rows_and_their_mismatched_pairs_share_the_row_prompt():
    unpaired = [{"input_ids": [1, 5, 6, 7, 2], "response_mask": [0, 0, 0, 1, 1], "kl_input_ids": [1, 5, 6, 8, 2],
                 "kl_response_mask": [0, 0, 0, 1, 1], "label": True}]
    batch = Collator("unpaired", PAD, batch_mode="padding_free")(unpaired)
    assert batch["input_ids"].shape == (1, 3 + 2 + 2)
    check_shared_layout(batch, [sequence([1, 5, 6], [7, 2]), sequence([1, 5, 6], [8, 2])])
    assert batch["desirable"].tolist() == [True]


def test_prepared_padding_free_pairs_share_their_prompt_unless_the_config_says_not(tokenizer):
    from posttrain.data.config import DataConfig
    from posttrain.data.pipeline import prepare_data

    rows = [{"prompt": "What is 2+3?", "chosen": " 5", "rejected": " 6"},
            {"prompt": "What is 12*7?", "chosen": " 84", "rejected": " 74"}]
    for share in (True, False):
        cfg = DataConfig(source="<rows>", batch_mode="padding_free", template="plain", share_prompts=share)
        prepared = prepare_data(cfg, tokenizer, accepts=("preference",), rows=rows)
        batch = prepared.collator([prepared.dataset[i] for i in range(2)])
        assert ("predictors" in batch) is share and ("sample_ids" in batch) is not share
