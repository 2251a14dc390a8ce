"""Shared fixtures: a locally trained tokenizer, a fresh tiny model, and one quick pretraining run."""

from __future__ import annotations

import collections
import itertools
import os
import shutil
import tempfile
from pathlib import Path

# Before torch starts its OpenMP pool: idle threads sleep instead of spinning, so a test run that shares
# the 2 cores with another process slows down in proportion instead of 100x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Measured kernel choices (models.cpu_attention) go to a cache of the test run's own, not the user's.
os.environ.setdefault("POSTTRAIN_CACHE_DIR", tempfile.mkdtemp(prefix="posttrain-test-cache-"))
# The suite's references are CPU computations (float64 loops, bitwise resume): on a GPU machine it still runs on the
# CPU unless POSTTRAIN_DEVICE says otherwise (models.device).
os.environ.setdefault("POSTTRAIN_DEVICE", "cpu")
# pytest-xdist's workers (README's `-n 2`) set COLUMNS=80, which posttrain's console obeys: without it the suite sees
# the console a log file gets (console.LOG_WIDTH) whether it runs in one process or in two.
os.environ.pop("COLUMNS", None)

import pytest
import torch

from posttrain.config import ModelConfig, load_config
from posttrain.data.corpus import plain_text, synthetic_documents
from posttrain.models import build_model, train_tokenizer

torch.set_num_threads(2)

# The files that take one worker two to three minutes (a Zen 3 EPYC, README's `-n 2 --dist loadfile`). pytest-xdist
# hands out the files with the most tests first, which made these two (four tests each) among the last: one worker ran
# the second alone for about a minute at the end of a 9:51 suite. Started first, the other worker's short files fill in.
LONGEST_FILES = ("tests/integration/test_rl_learns.py", "tests/e2e/test_demo.py")


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's controller: it takes the order made below
        config.option.loadscopereorder = False


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On pytest-xdist's workers: LONGEST_FILES first, then the files with the most tests, as pytest-xdist orders them
    (a stable sort: each file's tests keep their order). A run in one process keeps pytest's order."""
    if not hasattr(config, "workerinput"):
        return
    tests_in = collections.Counter(item.nodeid.split("::")[0] for item in items)
    first = {path: rank for rank, path in enumerate(LONGEST_FILES)}

    def order(item: pytest.Item) -> tuple[int, int]:
        path = item.nodeid.split("::")[0]
        return first.get(path, len(first)), -tests_in[path]

    items.sort(key=order)


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
    """One `pretrain --quick` run shared by every test that needs a pretrained model. Under pytest-xdist (README's
    `-n 2`) the first worker to ask makes it where the workers' directories are, and each worker gets a copy of its
    own: made once, and read or written by one process at a time, as in a run without workers."""
    import json

    from filelock import FileLock

    from posttrain.train.run_dir import RunResult

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _quick_pretraining(tmp_path_factory.mktemp("runs"))
    shared = tmp_path_factory.getbasetemp().parent  # every worker's basetemp is a directory in it
    with FileLock(shared / "pretrained_run.lock"):
        if not (shared / "pretrained_run.json").exists():
            made = _quick_pretraining(shared / "pretrained_run")
            (shared / "pretrained_run.json").write_text(json.dumps({"run_dir": str(made.run_dir)}))
    made = Path(json.loads((shared / "pretrained_run.json").read_text())["run_dir"])
    copy = shutil.copytree(made, tmp_path_factory.mktemp("runs") / made.name)
    summary = json.loads((copy / "summary.json").read_text())["summary"]
    return RunResult(run_dir=copy, final_dir=copy / "final", summary=summary)


def _quick_pretraining(out: Path):
    from posttrain.recipes import find_recipe
    from posttrain.recipes.pretrain import PretrainConfig, main

    recipe = find_recipe("pretrain")
    cfg = load_config(PretrainConfig, recipe.path, [f"run.out_dir={out}", "run.progress=false"], extra=recipe.quick)
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
    after its first checkpoint (later checkpoints, final/ and summary.json removed), resumes the copy with
    `resume("split")` (the same settings with run.name=split, run.resume=true), and asserts that it wrote the same
    metrics (timings aside), the same samples and bitwise the same final weights. Returns the metrics."""
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
        (split / "summary.json").unlink()  # a stopped run has no summary: one that has is finished
        resumed = resume("split")
        assert untimed(split / "metrics.jsonl") == untimed(full.run_dir / "metrics.jsonl")
        samples = full.run_dir / "samples.jsonl"
        if samples.exists():  # every step's samples once: none re-appended by the resumed process
            assert read_metrics(split / "samples.jsonl") == read_metrics(samples)
        a = AutoModelForCausalLM.from_pretrained(full.final_dir, local_files_only=True).state_dict()
        b = AutoModelForCausalLM.from_pretrained(resumed.final_dir, local_files_only=True).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        return untimed(full.run_dir / "metrics.jsonl")

    return check


# ----------------------------------------------------------------------------------------------
# A model as real instruct models ship: Qwen2 architecture, a ChatML tokenizer whose `bos_token` is
# `<|im_start|>` (the opener of every turn, as SmolLM2-Instruct's is) and which adds no BOS itself, EOS
# `<|im_end|>`, and Qwen2.5's chat template (default system turn, tool calls, no generation markers).

CHATML_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# Phi-3's: a turn ends `<|end|>` and a newline, and the whole conversation `<|endoftext|>` (its EOS).
PHI3_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")


def build_chatml_tokenizer(eos_token: str = "<|im_end|>", chat_template: str = CHATML_TEMPLATE,
                           special_tokens: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                           bos_token: str | None = "<|im_start|>"):
    """The ChatML tokenizer above; with other settings, the tokenizer of another family (a base Qwen's EOS
    `<|endoftext|>`, Phi-3's template and role tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from posttrain.data.tasks import get_task

    texts = [plain_text(d) for d in itertools.islice(synthetic_documents(seed=1), 2000)]
    texts += [r["prompt"] + " " + r["answer"] for r in get_task("arith").rows("verifiable", "train", size=500, seed=0)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=800, special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos_token, eos_token=eos_token,
                                   pad_token="<|endoftext|>", clean_up_tokenization_spaces=False)
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="session")
def phi3_tokenizer():
    return build_chatml_tokenizer("<|endoftext|>", PHI3_TEMPLATE,
                                  ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"), None)


@pytest.fixture(scope="session")
def base_chatml_tokenizer():
    """A base Qwen's: the ChatML template, whose turns end `<|im_end|>`, and EOS `<|endoftext|>`."""
    return build_chatml_tokenizer("<|endoftext|>")


@pytest.fixture(scope="session")
def chatml_tokenizer():
    return build_chatml_tokenizer()


@pytest.fixture(scope="session")
def chatml_model_dir(tmp_path_factory, chatml_tokenizer):
    """A tiny random-init Qwen2 model with the ChatML tokenizer, saved as a user's model directory is."""
    return save_qwen2_for(chatml_tokenizer, tmp_path_factory.mktemp("qwen2-chatml"))


@pytest.fixture(scope="session")
def base_chatml_model_dir(tmp_path_factory, base_chatml_tokenizer):
    return save_qwen2_for(base_chatml_tokenizer, tmp_path_factory.mktemp("qwen2-base-chatml"))


@pytest.fixture(scope="session")
def phi3_model_dir(tmp_path_factory, phi3_tokenizer):
    return save_qwen2_for(phi3_tokenizer, tmp_path_factory.mktemp("qwen2-phi3"))


def save_qwen2_for(tokenizer, path):
    """A tiny random-init Qwen2 model for `tokenizer`, saved with it in `path` as a user's model directory is."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
