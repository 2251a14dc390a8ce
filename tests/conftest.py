"""Shared fixtures: a locally trained tokenizer, a fresh tiny model, and one quick pretraining run."""

from __future__ import annotations

import itertools
import os
import shutil

# Before torch starts its OpenMP pool: idle threads sleep instead of spinning, so a test run that shares
# the 2 cores with another process slows down in proportion instead of 100x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from posttrain.config import ModelConfig, load_config
from posttrain.data.corpus import plain_text, synthetic_documents
from posttrain.models import build_model, train_tokenizer

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    """The project's tokenizer trained on a few thousand synthetic documents (about a second)."""
    documents = itertools.islice(synthetic_documents(seed=0), 3000)
    return train_tokenizer((plain_text(d) for d in documents), vocab_size=1024)


@pytest.fixture()
def tiny_model(tokenizer):
    """A randomly initialised tiny Llama model (fp32) matching `tokenizer`."""
    return build_model(ModelConfig(size="tiny"), tokenizer, seed=0)


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory):
    """One `pretrain --quick` run shared by every test that needs a pretrained model."""
    from posttrain.recipes import find_recipe
    from posttrain.recipes.pretrain import PretrainConfig, main

    out = tmp_path_factory.mktemp("runs")
    recipe = find_recipe("pretrain")
    cfg = load_config(PretrainConfig, recipe.path, [f"run.out_dir={out}", "run.progress=false"],
                      extra=recipe.quick)
    return main(cfg)


def _float64_norms(model: torch.nn.Module) -> None:
    """transformers' RMSNorm computes in float32 whatever the model's dtype; in float64 instead, so that
    summing the gradients of a shared prompt (one float64 sum, then the norm's backward) and summing them
    over separate copies (each through the norm's backward, then summed) agree to float64 rounding."""
    def forward(norm, hidden):
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return norm.weight * (hidden * torch.rsqrt(variance + norm.variance_epsilon))

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = forward.__get__(module)


@pytest.fixture()
def float64_norms():
    """`_float64_norms`: for float64 comparisons of layouts that sum a gradient in a different order."""
    return _float64_norms


@pytest.fixture()
def resumes_bitwise():
    """`check(full, resume)`: copies the finished run `full` (a RunResult with checkpoints) as if it had been stopped
    after its first checkpoint (later checkpoints and final/ removed), resumes the copy with `resume("split")` (the
    same settings with run.name=split, run.resume=true), and asserts that it wrote the same metrics (timings aside)
    and bitwise the same final weights. Returns the metrics."""
    from transformers import AutoModelForCausalLM

    from posttrain.train.metrics import read_metrics

    def untimed(path):
        return [{k: v for k, v in m.items() if not k.endswith(("_s", "_per_s", "_share"))} for m in read_metrics(path)]

    def check(full, resume):
        split = full.run_dir.parent / "split"
        shutil.copytree(full.run_dir, split)
        checkpoints = sorted((split / "checkpoints").glob("step-*"), key=lambda p: int(p.name.removeprefix("step-")))
        for later in checkpoints[1:]:
            shutil.rmtree(later)
        shutil.rmtree(split / "final")
        resumed = resume("split")
        assert untimed(split / "metrics.jsonl") == untimed(full.run_dir / "metrics.jsonl")
        a = AutoModelForCausalLM.from_pretrained(full.final_dir, local_files_only=True).state_dict()
        b = AutoModelForCausalLM.from_pretrained(resumed.final_dir, local_files_only=True).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        return untimed(full.run_dir / "metrics.jsonl")

    return check
