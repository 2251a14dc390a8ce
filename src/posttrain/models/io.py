"""Load and save models and tokenizers in Hugging Face format, offline and safely by default."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import pickle
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from posttrain.errors import ConfigError
from posttrain.models.device import default_device
from posttrain.models.dropout import disable_dropout as drop_dropout
from posttrain.models.kernels import use_fast_kernels

if TYPE_CHECKING:
    from posttrain.config import ModelConfig


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` means fp32 on every device: the master weights of mixed precision; `train.precision` decides
    what the matmuls compute in (bf16 autocast), so a trained model and its frozen reference see the same."""
    if name == "auto":
        return torch.float32
    dtypes = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be auto or one of {', '.join(dtypes)}, got {name!r}")
    return dtypes[name]


# The files that are the model (weights, config, tokenizer) among those of its directory, which may also hold an
# evaluation's results or notes that change nothing.
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model", ".tiktoken", ".jinja", ".index.json")
MODEL_FILE_NAMES = ("merges.txt", "vocab.txt", "vocab.json", "config.json", "generation_config.json", "tokenizer.json",
                    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.json",
                    "adapter_config.json", "preprocessor_config.json")


def model_fingerprint(path: str | Path) -> dict[str, str]:
    """Each file of the model directory `path` that is the model (weights, config, tokenizer; not subdirectories)
    with its size and a digest of blocks sampled through it: the first and last MiB and 64 blocks of 64 KiB evenly
    between. A copy or a move of the model has the same; another model, or the same one trained further or edited,
    does not (a change to its weights shows in the sampled blocks; no proof against one made to slip through them).
    A few MiB read, whatever the model's size."""
    fingerprint = {}
    for file in sorted(Path(path).iterdir()):
        name = file.name
        if not file.is_file() or not (name.endswith(MODEL_FILE_SUFFIXES) or name in MODEL_FILE_NAMES):
            continue
        size = file.stat().st_size
        digest = hashlib.sha256()
        block, edge = 1 << 16, 1 << 20
        with file.open("rb") as f:
            if size <= 2 * edge + 64 * block:
                digest.update(f.read())
            else:
                for offset in (0, *(edge + i * (size - 2 * edge - block) // 63 for i in range(64)), size - edge):
                    f.seek(offset)
                    digest.update(f.read(edge if offset in (0, size - edge) else block))
        fingerprint[name] = f"{size}:{digest.hexdigest()[:32]}"
    return fingerprint


def check_model_dir(path: str | Path, field: str = "model.path", *, trust_remote_code: bool = False,
                    trust_hint: bool = True) -> Path:
    """`path` as a Hugging Face model directory, or a one-line error naming the file at fault: config.json
    missing, not a JSON object, or naming a model_type this transformers does not know (and no auto_map
    code it is trusted to run; `trust_hint`: whether model.trust_remote_code would let it run)."""
    directory = Path(path)
    config_file = directory / "config.json"
    if not directory.exists():
        raise ConfigError(f"{directory} does not exist", field=field)
    if not config_file.is_file():
        raise ConfigError(f"{directory} is not a Hugging Face model directory (no config.json)", field=field)
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot be read ({err})", file=str(config_file), field=field) from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"not valid JSON ({err.msg}, column {err.colno})", file=str(config_file), line=err.lineno,
                          field=field) from err
    if not isinstance(config, dict):
        raise ConfigError("not a JSON object", file=str(config_file), field=field)
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING and not (trust_remote_code and "auto_map" in config):
        known = "" if model_type is None else f"unknown model_type {model_type!r}"
        trusts = "set model.trust_remote_code=true" if trust_hint else "which posttrain does not run for this model"
        hint = f" (custom code: {trusts})" if "auto_map" in config else ""
        raise ConfigError(f"{known or 'no model_type'}: this transformers cannot build it{hint}",
                          file=str(config_file), field=field)
    return directory


def check_model_weights(directory: Path, field: str = "model.path") -> None:
    """A one-line error when `directory` holds no weights file transformers would load."""
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("*.bin")) \
            and not any(directory.glob("*.safetensors.index.json")):
        raise ConfigError(f"{directory} has no weights (model.safetensors)", field=field)


@contextlib.contextmanager
def loading_errors(directory: Path, field: str = "model.path") -> Iterator[None]:
    """Turn what a damaged model directory makes transformers raise (a truncated or corrupt weights file, a
    config.json that does not fit them) into a one-line error naming the directory."""
    try:
        yield
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError, pickle.UnpicklingError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, SafetensorError):  # it does not say which file: a directory may hold several
            weights = ", ".join(sorted(p.name for p in directory.glob("*.safetensors")))
            reason = f"a weights file ({weights}) is damaged: {reason}"
        if isinstance(err, pickle.UnpicklingError):  # torch's own message asks to load it with weights_only=False
            weights = ", ".join(sorted(p.name for p in directory.glob("*.bin")))
            reason = (f"a weights file ({weights}) holds Python objects besides tensors, which posttrain does not "
                      "unpickle (they could run code): convert it to safetensors where you trust it")
        raise ConfigError(f"cannot load the model: {reason}", file=str(directory), field=field) from err


ADAPTER_CONFIG = "adapter_config.json"


def adapter_base(path: str | Path, field: str = "model.path") -> Path | None:
    """The base model directory of the peft adapter saved at `path` (LoRA with merge_on_save=false, prefix-tuning:
    an adapter_config.json and no config.json), or None when `path` is not an adapter. The base must be a local
    model directory (peft records the path the base was loaded from): nothing is downloaded."""
    directory = Path(path)
    file = directory / ADAPTER_CONFIG
    if (directory / "config.json").is_file() or not file.is_file():
        return None
    try:
        base = json.loads(file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise ConfigError(f"cannot be read as a peft adapter's config ({err})", file=str(file), field=field) from err
    if not base or not (Path(base) / "config.json").is_file():
        raise ConfigError(f"a peft adapter over {base!r}, which is not a local model directory (relative paths count "
                          "from where you run): copy or link the base model there", file=str(file), field=field)
    return Path(base)


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    base = adapter_base(path)
    if base is not None and not (Path(path) / "tokenizer_config.json").is_file():
        path = base  # an adapter saved without its tokenizer: the base model's
    directory = Path(path) if base is not None else check_model_dir(path, trust_remote_code=trust_remote_code)
    with loading_errors(directory):
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        # Many base models ship without a pad token; reuse EOS and rely on attention masks. Only in memory:
        # `save_pretrained` writes the tokenizer without it, as it came (a trainer that masks the pad token's labels
        # would otherwise never train the EOS of a model saved here).
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.pad_from_eos = True
    return tokenizer


def check_same_vocabulary(policy: str | Path | PreTrainedTokenizerBase, other: str | Path, field: str, *,
                          trust_remote_code: bool = False,
                          remedy: str = "Start the critic from a model with the policy's tokenizer (critic.init="
                                        "policy)") -> None:
    """A model that reads the policy's token ids (PPO's critic, started from a reward model or another checkpoint;
    the KL reference of an evaluation) has every token of the policy's vocabulary (its tokenizer, or the model
    directory of one) at the same id (tokens of its own beyond them are fine), or a ConfigError naming `field`,
    with `remedy`: with another one it reads each id as another token (a larger vocabulary silently, a smaller one
    with an index error mid-run)."""
    tokenizer = (policy if isinstance(policy, PreTrainedTokenizerBase)
                 else load_tokenizer(policy, trust_remote_code=trust_remote_code))
    mine = tokenizer.get_vocab()
    theirs = load_tokenizer(other, trust_remote_code=trust_remote_code).get_vocab()
    differ = sum(theirs.get(token) != index for token, index in mine.items())
    if differ:
        raise ConfigError(f"{other} has another tokenizer than the policy ({len(theirs)} tokens against {len(mine)}, "
                          f"{differ} of the policy's with another id or none): it would read the policy's token ids "
                          f"as other tokens. {remedy}", field=field)


def check_tokenizer_fits(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module, field: str = "model.path") -> None:
    """Every id the tokenizer gives has a row in the model's input embedding (a larger embedding, as Qwen pads its
    vocabulary to a round size, is fine), or a ConfigError naming `field`: an id past it failed mid-run (an index
    error in the embedding, on a GPU a device-side assert) at the first row or prompt that used one, or never, while
    the data happened to avoid them."""
    try:
        embedding = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):  # a model of its own code that does not say: nothing to check
        return
    rows = getattr(embedding, "num_embeddings", None)
    if rows is None:
        return
    vocabulary = tokenizer.get_vocab()
    beyond = sorted((index, token) for token, index in vocabulary.items() if index >= rows)
    if beyond:
        shown = ", ".join(repr(token) for _, token in beyond[:3]) + (" ..." if len(beyond) > 3 else "")
        raise ConfigError(f"the tokenizer has {len(beyond)} token(s) with ids past the model's {rows} embedding rows "
                          f"({shown}: ids {beyond[0][0]}-{beyond[-1][0]}): the model cannot read them. Use the "
                          "tokenizer the model was trained with, or resize the model's embeddings to the tokenizer "
                          "(model.resize_token_embeddings(len(tokenizer))) and save it", field=field)


def from_model_dir(auto_class: Any, path: str | Path, *, trust_remote_code: bool = False, dtype: str = "auto",
                   field: str = "model.path", **kwargs: Any) -> tuple[PreTrainedModel, Path]:
    """`auto_class.from_pretrained` on the local model directory `path` (and the directory): every fault of
    the directory — config, weights, their loading — a one-line error naming `field`."""
    directory = check_model_dir(path, field, trust_remote_code=trust_remote_code)
    check_model_weights(directory, field)
    # transformers 5.25 opts every loaded model into hub kernels when the `kernels` package is installed (it is
    # now a dependency): layers whose code is fetched from the Hub on a GPU, and on any device every train()/eval()
    # re-kernelizes, resetting forwards set on the layers. Nothing is fetched at run time here: off, unless asked.
    kwargs.setdefault("use_kernels", False)
    with loading_errors(directory, field):
        model = auto_class.from_pretrained(str(directory), local_files_only=True, trust_remote_code=trust_remote_code,
                                           dtype=resolve_dtype(dtype), **kwargs)
    return model, directory


def load_causal_lm(path: str | Path, *, trust_remote_code: bool = False, dtype: str = "auto",
                   device: torch.device | str | None = None, disable_dropout: bool = False,
                   field: str = "model.path") -> PreTrainedModel:
    """The causal LM at `path`, on `device` (None: the process's, `models.device.default_device`); with
    `disable_dropout`, every dropout of it off (`models.dropout`). A directory without all of its weights is a
    ConfigError naming `field` (`check_every_weight_loaded`).

    A peft adapter directory (`adapter_base`) loads over its base model: LoRA merged into the base weights (what
    merge_on_save would have saved; every weight trainable again, as in any loaded model), prefix-tuning as the peft
    model (it cannot merge: it can be evaluated and sampled, not trained on, `adapters.check_adapter`)."""
    base = adapter_base(path)
    if base is not None:
        from peft import PeftModel

        model = load_causal_lm(base, trust_remote_code=trust_remote_code, dtype=dtype, device=device,
                               disable_dropout=disable_dropout, field=field)
        with loading_errors(Path(path)):
            adapted = PeftModel.from_pretrained(model, str(path))
        if adapted.active_peft_config.is_prompt_learning:
            return adapted
        return adapted.merge_and_unload().requires_grad_(True)
    (model, loading), directory = from_model_dir(AutoModelForCausalLM, path, trust_remote_code=trust_remote_code,
                                                 dtype=dtype, field=field, output_loading_info=True)
    check_every_weight_loaded(directory, model.config, loading["missing_keys"], field)
    use_fast_kernels(model)
    if disable_dropout:
        drop_dropout(model)
    return model.to(device or default_device())


def check_every_weight_loaded(directory: Path, config: Any, missing: Sequence[str], field: str) -> None:
    """A causal LM whose directory lacks some of its weights (`missing`, as transformers reports them; tied ones are
    not) would start those at random and train on without a word (transformers' own report is silenced here): a
    reward model's directory given for the policy (a `score` head, no output layer), or a checkpoint that lost a
    tensor. A ConfigError naming `field`; `config` is the loaded one (its `architectures` as saved)."""
    if not missing:
        return
    names = sorted(missing)
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    architectures = getattr(config, "architectures", None) or []
    scorer = [a for a in architectures if not a.endswith("ForCausalLM") and not a.endswith("LMHeadModel")]
    why = (f"it is a {', '.join(scorer)} (a reward or value model), not a causal LM: give a language model's "
           "directory (e.g. runs/sft/final)" if scorer else "its weight files lack them (an incomplete or another "
           "model's checkpoint)")
    raise ConfigError(f"{directory} has no saved {shown}, which would start at random: {why}", field=field)


def load_tokenizer_and_model(cfg: ModelConfig,
                             compares_logprobs: bool = True) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The tokenizer and causal LM a recipe's `model:` section names (its path, trust_remote_code, dtype and
    disable_dropout; `compares_logprobs`: whether the stage does, which turns dropout off by default)."""
    tokenizer = load_tokenizer(cfg.path, trust_remote_code=cfg.trust_remote_code)
    model = load_causal_lm(cfg.path, trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype,
                           disable_dropout=cfg.drops_dropout(compares_logprobs))
    check_tokenizer_fits(tokenizer, model)
    return tokenizer, model


def save_pretrained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path,
                    answer_ends: Collection[int] = ()) -> Path:
    """Write model (safetensors) and tokenizer side by side: a directory `from_pretrained` can load.
    `answer_ends`: the tokens the model was trained to end its answers with (`data.tokenize.turn_end_ids`), which
    its generation_config.json is to stop at (`_stop_at_answer_ends`).

    Under torchrun every rank calls this: an FSDP-sharded model is gathered into one full state dict
    (a collective), and rank 0 alone writes it, so `final/` is an ordinary Hugging Face directory.
    """
    import torch.distributed as dist

    out = Path(directory)
    state_dict = _consolidated_state_dict(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        extra = {"state_dict": state_dict} if state_dict is not None else {}
        model.save_pretrained(str(out), safe_serialization=True, **extra)
        _stop_at_answer_ends(model, out, answer_ends)
        follow_umask(out)
        if getattr(tokenizer, "pad_from_eos", False):  # `load_tokenizer`'s pad token, not the tokenizer's own
            tokenizer = copy.deepcopy(tokenizer)
            tokenizer.pad_token = None
        tokenizer.save_pretrained(str(out))
    if dist.is_initialized():
        dist.barrier()
    return out


def follow_umask(directory: str | Path) -> None:
    """Give the safetensors files under `directory` the mode any new file gets (0666 less the umask): safetensors
    0.8 writes its files 0600, readable by their owner alone, where the rest of a model directory is 0644 and a
    model saved for a team is read by others."""
    mode = 0o666 & ~_umask()
    for path in Path(directory).rglob("*.safetensors"):
        if path.is_file() and path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)


def _umask() -> int:
    try:  # Linux tells it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _stop_at_answer_ends(model: torch.nn.Module, out: Path, answer_ends: Collection[int]) -> None:
    """Add to the saved generation_config.json's eos_token_id the answer ends it lacks. transformers' `generate`,
    vLLM and TGI stop where that file says, and a base model's file names EOS alone (Qwen2.5's `<|endoftext|>`), not
    the chat template's end of turn (`<|im_end|>`) that the run trained the model to end its answers with and
    sampled up to: the exported model would write it and go on into made-up turns. The configured ids stay first
    (tools that take one stop token take the first), as in the instruct models' own files. A peft adapter's
    directory has no file of the kind to write (peft and vLLM read the base model's)."""
    from peft import PeftModel

    config = getattr(model, "generation_config", None)
    if config is None or not answer_ends or isinstance(model, PeftModel):
        return
    configured = config.eos_token_id
    listed = list(configured) if isinstance(configured, (list, tuple)) else [configured] * (configured is not None)
    missing = sorted(set(answer_ends) - set(listed))
    if missing:
        config = copy.deepcopy(config)
        config.eos_token_id = listed + missing
        # A config marked as made from the model's config is made again from config.json by older transformers'
        # `generate`, which would drop the added ids
        config._from_model_config = False
        config.save_pretrained(str(out))


def _consolidated_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full state dict of a model whose parameters are sharded DTensors (FSDP2), on rank 0; None otherwise."""
    if not any(hasattr(p, "full_tensor") for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
