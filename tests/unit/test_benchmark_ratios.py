"""The harnesses' printed ratios pair runs as the docs do (benchmarks/README.md: consecutive posttrain, TRL pairs)."""

from benchmarks.common import print_ratios


def _row(library: str, workload: str, seconds: float, peak_rss_mb: float | None = None) -> dict:
    return {"library": library, "workload": workload, "s_per_step": seconds, "peak_rss_mb": peak_rss_mb}


def _printed(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_each_posttrain_run_is_compared_with_the_trl_run_after_it(capsys):
    print_ratios([_row("posttrain", "dpo", 0.2), _row("trl", "dpo", 0.5),
                  _row("posttrain", "dpo", 0.25), _row("trl", "dpo", 1.0)])
    assert _printed(capsys) == ["dpo: posttrain is 2.50x TRL per step (the same workload)",   # 0.5 / 0.2
                                "dpo: posttrain is 4.00x TRL per step (the same workload)"]   # 1.0 / 0.25


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
                                "rm, padding_free: posttrain is 4.00x TRL per step (TRL: rm, padded)"]


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
        "sft: posttrain is 2.00x TRL per step (the same workload)"]                          # 0.6 / 0.3, no RSS ratio
