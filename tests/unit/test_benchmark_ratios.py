"""The harnesses' printed ratios pair runs as the docs do (benchmarks/README.md: consecutive posttrain, TRL pairs)."""

import pytest

from benchmarks.common import median_interval, print_ratios, worker_specs


def _row(library: str, workload: str, seconds: float, peak_rss_mb: float | None = None) -> dict:
    return {"library": library, "workload": workload, "s_per_step": seconds, "peak_rss_mb": peak_rss_mb}


def _printed(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_each_posttrain_run_is_compared_with_the_trl_run_after_it(capsys):
    print_ratios([_row("posttrain", "dpo", 0.2), _row("trl", "dpo", 0.5),
                  _row("posttrain", "dpo", 0.25), _row("trl", "dpo", 1.0)])
    assert _printed(capsys) == ["dpo: posttrain is 2.50x TRL per step (the same workload)",   # 0.5 / 0.2
                                "dpo: posttrain is 4.00x TRL per step (the same workload)",   # 1.0 / 0.25
                                "dpo: median of 2 pairs 3.25x TRL per step (range 2.50-4.00x; a 95% interval "
                                "needs 6 pairs) (the same workload)"]


def test_a_posttrain_run_after_the_last_trl_run_takes_the_last_one_before_it(capsys):
    print_ratios([_row("trl", "sft", 0.9), _row("trl", "sft", 0.6), _row("posttrain", "sft", 0.3)])
    assert _printed(capsys) == ["sft: posttrain is 2.00x TRL per step (the same workload)"]   # 0.6 / 0.3


def test_the_same_workload_wins_over_a_nearer_run_of_another(capsys):
    print_ratios([_row("posttrain", "a", 0.5), _row("trl", "b", 1.0), _row("trl", "a", 2.0)])
    assert _printed(capsys) == ["a: posttrain is 4.00x TRL per step (the same workload)"]     # 2.0 / 0.5


def test_other_work_is_paired_the_same_way_and_named(capsys):
    print_ratios([_row("posttrain", "rm, padding_free", 0.2), _row("trl", "rm, padded", 0.5),
                  _row("posttrain", "rm, padding_free", 0.25), _row("trl", "rm, padded", 1.0)])
    assert _printed(capsys) == ["rm, padding_free: posttrain is 2.50x TRL per step (TRL: rm, padded)",
                                "rm, padding_free: posttrain is 4.00x TRL per step (TRL: rm, padded)",
                                "rm, padding_free: median of 2 pairs 3.25x TRL per step (range 2.50-4.00x; a 95% "
                                "interval needs 6 pairs) (TRL: rm, padded)"]


def test_nothing_is_printed_without_a_trl_run(capsys):
    print_ratios([_row("posttrain", "dpo", 0.2)])
    assert _printed(capsys) == []


def test_the_peak_rss_of_the_same_pair_follows_where_both_runs_have_one(capsys):
    print_ratios([_row("posttrain", "grpo", 0.2, 900.0), _row("trl", "grpo", 1.0, 1800.0),
                  _row("posttrain", "grpo", 0.25, 1000.0), _row("trl", "grpo", 0.5, 800.0),
                  _row("posttrain", "sft", 0.3, 700.0), _row("trl", "sft", 0.6, 0.0)])  # TRL's peak not measured
    assert _printed(capsys) == [
        "grpo: posttrain is 5.00x TRL per step, peak RSS 0.50x TRL's (the same workload)",   # 1.0 / 0.2, 900 / 1800
        "grpo: posttrain is 2.00x TRL per step, peak RSS 1.25x TRL's (the same workload)",   # 0.5 / 0.25, 1000 / 800
        "sft: posttrain is 2.00x TRL per step (the same workload)",                          # 0.6 / 0.3, no RSS ratio
        "grpo: median of 2 pairs 3.50x TRL per step (range 2.00-5.00x; a 95% interval needs 6 pairs) "
        "(the same workload)"]


def test_the_median_interval_is_the_order_statistics_whose_binomial_coverage_reaches_95_percent():
    # n = 6: the range covers the median with 1 - 2 / 2^6 = 0.96875; the 2nd and 5th values only 1 - 2 * 7 / 64.
    assert median_interval([3.0, 1.0, 6.0, 2.0, 5.0, 4.0]) == (3.5, (1.0, 6.0, 1 - 2 / 64))
    # n = 9: 2nd and 8th values, 1 - 2 * (1 + 9) / 512 = 0.9609; the 3rd and 7th would be 1 - 2 * 46 / 512 = 0.82.
    assert median_interval([float(v) for v in range(9, 0, -1)]) == (5.0, (2.0, 8.0, 1 - 20 / 512))
    # n = 5: even the range covers it with only 1 - 2 / 32 = 0.9375.
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) == (3.0, None)


def test_repeated_pairs_end_with_their_median(capsys):
    rows = []
    for posttrain, trl in ((0.2, 1.0), (0.25, 1.0), (0.5, 1.0)):  # ratios 5, 4, 2
        rows += [_row("posttrain", "grpo", posttrain), _row("trl", "grpo", trl)]
    print_ratios(rows)
    assert _printed(capsys)[-1] == ("grpo: median of 3 pairs 4.00x TRL per step (range 2.00-5.00x; a 95% interval "
                                    "needs 6 pairs) (the same workload)")


def test_six_pairs_give_a_95_percent_interval(capsys):
    rows = []
    for ratio in (5.0, 5.5, 4.5, 6.0, 5.2, 4.8):
        rows += [_row("posttrain", "grpo", 1.0), _row("trl", "grpo", ratio)]
    print_ratios(rows)
    assert _printed(capsys)[-1] == ("grpo: median of 6 pairs 5.10x TRL per step, 96.9% interval 4.50-6.00x "
                                    "(the same workload)")  # (5.0 + 5.2) / 2; the range, 1 - 2 / 64


def test_pairs_in_different_precisions_are_named_and_summarised_apart(capsys):
    def row(library, seconds, precision):
        return {**_row(library, "grpo", seconds), "precision": precision}

    print_ratios([row("posttrain", 1.0, "bf16"), row("trl", 8.0, "fp32"), row("posttrain", 2.0, "fp32"),
                  row("trl", 10.0, "fp32"), row("posttrain", 1.0, "bf16"), row("trl", 7.0, "fp32")])
    assert _printed(capsys) == [
        "grpo: posttrain is 8.00x TRL per step (the same workload; posttrain bf16, TRL fp32)",
        "grpo: posttrain is 5.00x TRL per step (the same workload; both fp32)",
        "grpo: posttrain is 7.00x TRL per step (the same workload; posttrain bf16, TRL fp32)",
        "grpo: median of 2 pairs 7.50x TRL per step (range 7.00-8.00x; a 95% interval needs 6 pairs) "
        "(the same workload; posttrain bf16, TRL fp32)"]


def test_worker_specs_take_each_runs_precision_or_the_harnesss():
    assert worker_specs("posttrain:bf16,trl:fp32,posttrain,trl", "fp32") == [
        ("posttrain", "bf16"), ("trl", "fp32"), ("posttrain", "fp32"), ("trl", "fp32")]
    for bad in ("posttrain:fp16", "torchtune", "trl:"):
        with pytest.raises(SystemExit, match="LIBRARY"):
            worker_specs(bad, "fp32")
