"""`posttrain eval <DPO or KTO run> --data FILE`: the stage's own held-out loss and statistics (DPO's reward accuracy
and margins; KTO's per-label rewards) of the run's model on a file of its kind of rows (preference or ranking rows;
unpaired rows for KTO), against the reference the run trained with (its reference.path, else the model it started
from): what the run measures with eval.source=FILE, measured after it (TRL's `trainer.evaluate()` on a held-out set).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.config import load_config
from posttrain.data.config import STAGE_FORMATS, DataConfig
from posttrain.data.pipeline import Prepared, prepare_data
from posttrain.data.sources import source_format
from posttrain.errors import DataError
from posttrain.eval import heldout
from posttrain.eval.evaluate import (
    EvalOptions,
    Target,
    eval_precision,
    in_workdir,
    load_policy,
    out_path,
    write_result,
)
from posttrain.models.device import default_device
from posttrain.models.precision import autocast
from posttrain.recipes import dpo, kto
from posttrain.train.progress import RunProgress
from posttrain.train.run_dir import check_writable

# Each stage's config and its held-out evaluation, (config, rows, tokenizer, model, progress) -> parts
STAGES: dict[str, tuple[type, Callable[..., list[heldout.Part]]]] = {
    "dpo": (dpo.DPOConfig, lambda cfg, rows, tokenizer, model, progress: dpo.heldout_parts(
        cfg, rows, tokenizer, model, None, progress)),
    "kto": (kto.KTOConfig, lambda cfg, rows, tokenizer, model, progress: kto.heldout_part(cfg, rows, model, progress)),
}


def comparison_stage(target: Target, source: str) -> str | None:
    """The stage whose held-out loss measures `target` on `source`: a DPO (offline or on-policy) or KTO run's model
    and a file of that stage's rows; else None (a policy's completions of prompt rows are scored instead)."""
    stage = target.run_config.get("stage")
    if target.run_dir is None or not Path(source).exists() or stage not in STAGES:
        return None
    try:
        source_format(_data_settings(target, source), STAGE_FORMATS[stage])
    except DataError:  # not that stage's rows (its prompt rows are scored as a policy's are)
        return None
    return stage


def evaluate_comparisons(target: Target, options: EvalOptions, stage: str, write: bool = True) -> dict[str, Any]:
    """The stage's held-out metrics (eval_*) of the run's model on the first `options.problems` rows of
    `options.data`, against the run's reference, written as `evaluate` writes its results."""
    if write:
        check_writable(out_path(target, options).parent, "name a writable file with --out")
    config_class, parts = STAGES[stage]
    start = in_workdir(target, target.section("model").get("path"))
    reference = in_workdir(target, target.section("reference").get("path")) or start
    # The run's settings (loss, beta, template, batch sizes), with the file as its held-out rows and the reference
    # it trained against named (the run's own evaluation, before training, took the starting policy for it)
    cfg = load_config(config_class, target.run_dir / "config.yaml", extra={
        "eval.source": options.data, "data.eval_split": 0.0, "model.path": start, "reference.path": reference,
        **{f"data.{k}": v for k, v in options.data_settings.items()}})
    precision = eval_precision(options)
    tokenizer, model = load_policy(target)
    model.eval()
    rows = _rows(cfg, tokenizer, model, options.problems, stage)
    with autocast(precision, default_device()):
        metrics = heldout.Evaluation(parts(cfg, rows, tokenizer, model, RunProgress(enabled=False)), None).run(
            model, 0)
    result = {"model": str(target.model_dir), "data": options.data, "precision": precision, "kind": stage,
              "reference": reference, "rows": len(rows.dataset), **metrics}
    if write:
        write_result(target, result, options)
    return result


def _rows(cfg: Any, tokenizer: Any, model: Any, limit: int, stage: str) -> Prepared:
    held = dataclasses.replace(heldout.heldout_data(cfg.data, cfg.eval), limit=limit)
    return prepare_data(held, tokenizer, accepts=STAGE_FORMATS[stage], mask_dtype=model.dtype)


def _data_settings(target: Target, source: str) -> DataConfig:
    data = {k: v for k, v in target.section("data").items() if k in ("columns", "format")}
    return load_config(DataConfig, {**data, "source": source, "format": "auto"})
