"""A stage called from Python (a notebook, a script that runs several) leaves the process as it found it: torch's
threads and the global random generators, the run's lock (a shell can resume or overwrite the run), no reward
function child left and an edited reward file read anew by the next run; a config built or changed directly is
checked as a loaded one; a config of another stage is refused."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from posttrain.config import ModelConfig, load_config
from posttrain.errors import ConfigError
from posttrain.models import build_model, save_pretrained
from posttrain.recipes import find_recipe, grpo, sft
from posttrain.train.metrics import read_metrics
from posttrain.train.run_dir import run_lock_file


@pytest.fixture(scope="module")
def lm_dir(tokenizer, tmp_path_factory):
    model = build_model(ModelConfig(size="tiny"), tokenizer, seed=0)
    return str(save_pretrained(model, tokenizer, tmp_path_factory.mktemp("lm") / "lm"))


def sft_config(model_dir, out, *overrides):
    return load_config(sft.SFTConfig, find_recipe("sft").path,
                       [f"model.path={model_dir}", f"run.out_dir={out}", "run.progress=false", "train.max_steps=2",
                        "train.batch_size=8", "train.micro_batch_size=8", "train.save_every=0", "data.size=32",
                        "eval_before=false", "eval.problems=4", "eval.max_new_tokens=4", *overrides])


def _reward_children() -> list[int]:
    """This process's children that serve a reward function (rewards/function_process.py), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        if parent == os.getpid() and b"function_process" in command:
            found.append(int(stat.parent.name))
    return found


def _rng_draws():
    return random.random(), float(np.random.random()), torch.rand(1).item()


def test_a_stage_called_from_python_leaves_the_process_as_it_found_it(lm_dir, tmp_path):
    threads = torch.get_num_threads()
    wanted = 1 if threads != 1 else 2
    torch.set_num_threads(wanted)
    try:
        random.seed(11), np.random.seed(11), torch.manual_seed(11)
        expected = _rng_draws()
        random.seed(11), np.random.seed(11), torch.manual_seed(11)
        result = sft.main(sft_config(lm_dir, tmp_path, f"run.threads={3 - wanted}", "run.seed=5"))
        assert torch.get_num_threads() == wanted  # the run's own 3 - wanted threads were put back
        assert _rng_draws() == expected  # as if the run had not drawn (it seeded with run.seed=5)
    finally:
        torch.set_num_threads(threads)
    # The run's lock is released: another process (a shell's `posttrain resume`) may take it now.
    _lock_is_free(result.run_dir)
    # ... also when the stage ran as the CLI runs it (its run directory checked, and locked, before `main`)
    from posttrain.recipes import run_stage

    again = run_stage("sft", None, [f"model.path={lm_dir}", f"run.out_dir={tmp_path}", "run.name=cli-like",
                                    "run.progress=false", "train.max_steps=1", "train.batch_size=8",
                                    "train.micro_batch_size=8", "data.size=16", "eval_before=false",
                                    "eval.problems=4", "eval.max_new_tokens=4"])
    _lock_is_free(again.run_dir)


def _lock_is_free(run_dir):
    with open(run_lock_file(run_dir), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while this process still held it


@pytest.mark.parametrize("in_process", [False, True])
def test_an_edited_reward_file_is_read_by_the_next_run_and_no_child_outlives_a_run(lm_dir, tmp_path, in_process):
    """A child process (or, in process, the imported function) kept the file's code as the first run read it."""
    reward = tmp_path / "my_reward.py"
    before = _reward_children()

    def run(name, value):
        reward.write_text(f"def r(prompts, completions, **kw):\n    return [{value}] * len(completions)\n")
        cfg = load_config(grpo.GRPOConfig, find_recipe("grpo").path, [
            f"model.path={lm_dir}", f"run.out_dir={tmp_path}", f"run.name={name}", "run.progress=false",
            "train.save_every=0", "eval.problems=4", "eval.samples=2", "eval.max_new_tokens=4", "eval_before=false",
            "data.size=16", "train.max_steps=1", "train.batch_size=8", "train.micro_batch_size=8",
            "sampling.samples_per_prompt=4", "sampling.max_new_tokens=4", f"reward.functions={{{reward}:r: 1.0}}",
            f"reward.in_process={in_process}"])
        result = grpo.main(cfg)
        assert _reward_children() == before  # the run's child was stopped with it
        return read_metrics(result.run_dir / "metrics.jsonl")[0]["reward"]

    assert run("first", 1.0) == 1.0
    assert run("second", 2.0) == 2.0  # the old child (imported at the first run) scored 1.0 again


def test_a_config_built_or_changed_directly_is_checked_as_a_loaded_one(lm_dir, tmp_path):
    cfg = sft_config(lm_dir, tmp_path, "run.name=checked")
    bad = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=-1.0))
    with pytest.raises(ConfigError, match="must be > 0") as err:
        sft.main(bad)
    assert err.value.field == "optim.lr"
    with pytest.raises(ConfigError, match="takes its stage's config, GRPOConfig, not SFTConfig"):
        grpo.main(cfg)
    from posttrain.recipes import ppo, rft

    assert issubclass(rft.RFTConfig, ppo.PPOConfig)  # and yet another stage's (mode=offline is no PPO run)
    with pytest.raises(ConfigError, match="takes its stage's config, PPOConfig, not RFTConfig"):
        ppo.main(load_config(rft.RFTConfig, None, ["mode=offline", f"model.path={lm_dir}"]))
    assert not (tmp_path / "checked").exists()  # refused before anything was written
    # A setting of the right value but another type is coerced, as a loaded one is.
    changed = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1))
    from posttrain.config import check_config_object

    assert check_config_object(changed).optim.lr == 1.0 and isinstance(check_config_object(changed).optim.lr, float)
    assert check_config_object(cfg) == cfg
