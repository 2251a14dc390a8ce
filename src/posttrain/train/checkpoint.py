"""Atomic checkpoints with everything needed to resume bitwise identically on CPU.

Layout of `checkpoints/step-N/` (no pickle anywhere: tensors in safetensors, the rest in JSON):
  <module>/                HF format (model.safetensors + config.json, or a peft adapter), with the run's
                           tokenizer: `from_pretrained` and `posttrain eval` load it as they load `final/`
  optimizer-<name>.safetensors + optimizer-<name>.json   tensors / structure of the optimizer state
  state.json               step, scheduler states, RNG states (python, numpy), trainer and data state
  rng.safetensors          torch CPU (and CUDA) generator states
  config.yaml              the run's resolved config
  COMPLETE                 the manifest, written last (atomically): the step, and every other file's
                           size and sha256; a directory without it is never loaded

A checkpoint is written to `.tmp-step-N/` and renamed into place, and older ones are deleted only
after the new one is complete, so a crash or SIGKILL mid-save leaves the previous one loadable.
A checkpoint damaged afterwards (a truncated file, a deleted or edited one) fails its manifest check
when a run resumes, which then falls back to the newest intact one (`resume_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from posttrain.errors import ConfigError, RunDirError, refused_write
from posttrain.models.io import follow_umask, model_fingerprint
from posttrain.train.optim import from_lr_keyed_groups

COMPLETE = "COMPLETE"


def save_checkpoint(root: Path, step: int, *, modules: Mapping[str, torch.nn.Module],
                    optimizers: Mapping[str, torch.optim.Optimizer], schedulers: Mapping[str, Any],
                    trainer_state: dict[str, Any], config_text: str, keep_last: int,
                    keep_before: int | None = None, tokenizer: Any = None) -> Path:
    """Write `root/step-<step>/` atomically and prune to the newest `keep_last` checkpoints (and the one
    `prune_checkpoints` keeps from before step `keep_before`)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    try:
        _write_checkpoint(tmp, step, modules=modules, optimizers=optimizers, schedulers=schedulers,
                          trainer_state=trainer_state, config_text=config_text, tokenizer=tokenizer)
    except (OSError, SafetensorError) as err:  # a full disk, a quota, a read-only directory: the half-written one goes
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunDirError(unwritten_message(root, step, write_failure(err)), file=str(root)) from err
    if final.exists():  # a re-save of the same step (e.g. a stop right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    prune_checkpoints(root, keep_last, keep_before)
    return final


def write_failure(err: BaseException) -> str:
    """Why a write failed, in a few words: "No space left on device", also from inside safetensors' own error (its
    writer raises SafetensorError, not OSError) and a sharded save's (CheckpointException, "ranks: dict_keys([0, 1])"
    where each rank's own error says why)."""
    failures = getattr(err, "failures", None)  # torch.distributed.checkpoint's: each failed rank's own exception
    if isinstance(failures, dict) and failures:
        rank, (cause, _) = min(failures.items())
        return f"{write_failure(cause)}, on rank {rank}"
    refused = refused_write(err)
    if refused is not None:
        return refused[0]
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def unwritten_message(root: Path, step: int, reason: str) -> str:
    """What a save that failed says: why, and the checkpoint the run can resume from."""
    last = list_checkpoints(root)
    return (f"cannot write the checkpoint of step {step} ({reason}); "
            + (f"the last complete one, {last[-1].name}, is kept: free space and resume from it" if last
               else "no earlier one exists"))


def _write_checkpoint(tmp: Path, step: int, *, modules: Mapping[str, torch.nn.Module],
                      optimizers: Mapping[str, torch.optim.Optimizer], schedulers: Mapping[str, Any],
                      trainer_state: dict[str, Any], config_text: str, tokenizer: Any) -> None:
    """Every file of a checkpoint into `tmp`, flushed to disk and sealed by its manifest."""
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, module in modules.items():
        module.save_pretrained(str(tmp / name), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / name))
    for name, optimizer in optimizers.items():
        tensors, structure = _flatten_optimizer_state(optimizer.state_dict())
        save_file(tensors, str(tmp / f"optimizer-{name}.safetensors"))
        _write_json(tmp / f"optimizer-{name}.json", structure)
    rng_tensors, rng_json = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    _write_json(tmp / "state.json", {
        "step": step,
        "schedulers": {name: _jsonable(s.state_dict()) for name, s in schedulers.items()},
        "rng": rng_json,
        "trainer": trainer_state,
    })
    (tmp / "config.yaml").write_text(config_text, encoding="utf-8")
    follow_umask(tmp)
    _fsync_tree(tmp)
    write_manifest(tmp, step)
    _fsync_tree(tmp)


def prune_checkpoints(root: Path, keep_last: int, keep_before: int | None = None) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, except the newest one saved before step
    `keep_before` (the first skipped step: the last weights that had not yet given a non-finite or spiking
    step, which a diverged run is resumed from with a lower learning rate)."""
    found = list_checkpoints(root)
    before = [p for p in found if keep_before is not None and _step_of(p) < keep_before]
    protected = before[-1] if before else None
    for old in found[:-keep_last] if keep_last > 0 else []:
        if old != protected:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / COMPLETE).is_file() and p.name[5:].isdigit()]
    return sorted(found, key=_step_of)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _step_of(path: Path) -> int:
    return int(path.name[5:])


# ----------------------------------------------------------------------------------------------
# The manifest: what a checkpoint held when it was saved, checked before anything of it is loaded.


def write_manifest(directory: Path, step: int) -> None:
    """Record the size and sha256 of every file under `directory` in `directory/COMPLETE`, written last
    and atomically (a temporary name, then a rename), so a checkpoint is either sealed or ignored."""
    files = {str(path.relative_to(directory)): {"size": path.stat().st_size, "sha256": _sha256(path)}
             for path in sorted(directory.rglob("*")) if path.is_file() and path.name != COMPLETE}
    tmp = directory / f".{COMPLETE}.tmp"
    _write_json(tmp, {"step": step, "files": files})
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, directory / COMPLETE)


def checkpoint_fault(path: Path) -> str | None:
    """Why the checkpoint at `path` differs from what was saved (None: it is intact).

    A checkpoint from before manifests (COMPLETE holds only its step) has nothing to check against
    and counts as intact."""
    try:
        text = (path / COMPLETE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        return f"{COMPLETE} cannot be read ({err})"
    if text.strip() == path.name[5:]:
        return None
    try:
        manifest = json.loads(text)
        step, files = manifest["step"], manifest["files"]
        if step != _step_of(path) or not isinstance(files, dict):
            raise ValueError
        expected = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"its manifest {COMPLETE} is damaged"
    for name, (size, digest) in expected.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were saved"
        if _sha256(file) != digest:
            return f"{name} differs from what was saved (sha256 mismatch)"
    return None


def resume_checkpoint(root: Path, warn: Callable[[str], None], move_aside: bool = True) -> Path | None:
    """The newest intact checkpoint under `root` (None: there is none at all).

    Each newer damaged checkpoint is reported through `warn` (which one, and why) and moved aside to
    `damaged-step-N/` (by one process only: `move_aside`): kept for inspection, but no longer counted by
    `keep_last`, which would otherwise delete the intact checkpoint the run resumes from in favour of the
    damaged one. A directory whose checkpoints are all damaged is an error (and nothing is moved)."""
    found = list_checkpoints(root)
    faults: list[tuple[Path, str]] = []
    for path in reversed(found):
        fault = checkpoint_fault(path)
        if fault is None:
            for damaged, why in faults:
                aside = _unused(root / f"damaged-{damaged.name}")
                if move_aside:
                    os.replace(damaged, aside)
                warn(f"checkpoint {damaged} is damaged: {why}; moved to {aside.name}, resuming from {path.name}")
            return path
        faults.append((path, fault))
    if faults:
        listed = "; ".join(f"{p.name}: {why}" for p, why in faults)
        raise RunDirError(f"no intact checkpoint to resume from ({listed})", file=str(root))
    return None


# Settings a resumed run keeps, and why: the seed drew what the rest of the run depends on, not only its next steps
# (the data order of every epoch: a resumed position in another permutation trains some rows twice and skips
# others; the rollouts' sampling seeds; in pretraining the corpus and the tokenizer, whose ids the checkpoint's
# embeddings were trained on); the others decide what the checkpoint's tensors are (a changed one failed in
# torch's loading with a message cut at its first line).
KEPT_ON_RESUME = {
    "run.seed": "it drew the data order, the sampling and a pretraining's tokenizer",
    "model.path": "the checkpoint's weights are that model's",
    "reference.path": "the run's objective is measured against that model",
    "reward.model_path": "the run's rewards are that model's scores",
    "model.size": "it sets the model's shapes", "model.hidden_size": "it sets the model's shapes",
    "model.num_layers": "it sets the model's shapes", "model.num_heads": "it sets the model's shapes",
    "model.intermediate_size": "it sets the model's shapes",
    "tokenizer.vocab_size": "the tokenizer is trained again from it", "tokenizer.train_documents":
    "the tokenizer is trained again from it",
    "adapter.method": "it sets which tensors are trained", "adapter.r": "it sets the adapter's shapes",
    "adapter.target_modules": "it sets which layers the adapter has",
    "adapter.num_virtual_tokens": "it sets the adapter's shapes",
    "critic.kind": "it sets which value model the checkpoint holds",
}


# The settings of KEPT_ON_RESUME that name a model whose weights the checkpoint does not hold (a resume reads it
# again), and the name its files' fingerprint (`models.io.model_fingerprint`) is kept under in the checkpoint's
# trainer state: a resume compares files, not paths, so a moved model resumes and other files under the old path
# (a reference or reward model retrained in place) are refused.
MODEL_PATHS = {"model.path": "starting_model", "reference.path": "reference_model",
               "reward.model_path": "reward_model"}


def check_kept_settings(path: Path, settings: Mapping[str, Any], warn: Callable[[str], None] = print) -> None:
    """A ConfigError naming the first of `settings` (dotted key -> this run's value; those of `KEPT_ON_RESUME`) that
    differs from the checkpoint's config.yaml at `path` (nothing to check in one without it, or without the key).
    A model's path (`MODEL_PATHS`) is the model's files, not their path (`check_model_files`)."""
    config = path / "config.yaml"
    if not config.is_file():
        return
    saved_config = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    for key, value in settings.items():
        saved: Any = saved_config
        for part in key.split("."):
            saved = saved.get(part) if isinstance(saved, Mapping) else None
        if key in MODEL_PATHS:
            check_model_files(path, key, saved, value, warn)
        elif saved is not None and value is not None and _comparable(saved) != _comparable(value):
            raise ConfigError(f"the checkpoint {path.name} was trained with {key}={saved} and this run has "
                              f"{key}={value} ({KEPT_ON_RESUME[key]}): a resumed run keeps it (drop the override), "
                              "or starts afresh (run.resume=false)", field=key)


def check_model_files(path: Path, key: str, saved: str | None, value: str | None,
                      warn: Callable[[str], None]) -> None:
    """The model at `key` (model.path, reference.path, reward.model_path: `value`) must be the one the checkpoint at
    `path` was trained with (at `saved`, then): the same files (`model_fingerprint`, which the checkpoint keeps),
    wherever they are now. A model moved or copied elsewhere resumes with `key`=<its new place>; another model under
    the old path is refused, and so is a model named where the run had none (or none where it had one). A
    checkpoint from before the fingerprint was kept is compared with the old path's files where they still are."""
    if saved is None and value is None:
        return
    if saved is None or value is None:
        raise ConfigError(f"the checkpoint {path.name} was trained with {key}={saved} and this run has {key}={value} "
                          f"({KEPT_ON_RESUME[key]}): a resumed run keeps it (drop the override), or starts afresh "
                          "(run.resume=false)", field=key)
    if not Path(value).is_dir():
        return  # loading it says what is wrong
    recorded = _trainer_state(path).get(MODEL_PATHS[key])
    if recorded is None:
        if str(saved) == str(value):
            return
        if not Path(saved).is_dir():
            warn(f"the checkpoint {path.name} keeps no fingerprint of the model at {key} ({saved}, which is gone): "
                 f"{key}={value} is taken for it unchecked")
            return
        recorded = model_fingerprint(saved)
    now = model_fingerprint(value)
    if now == recorded:
        return
    differ = sorted(name for name in recorded.keys() | now.keys() if recorded.get(name) != now.get(name))
    raise ConfigError(f"{value} is not the model the checkpoint {path.name} was trained with at {key} ({saved} then): "
                      f"{', '.join(differ[:3])}{' ...' if len(differ) > 3 else ''} differ; resume with "
                      f"{key}=<where that model is now>, or start afresh (run.resume=false)", field=key)


def _trainer_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "state.json").read_text(encoding="utf-8")).get("trainer") or {}
    except (OSError, ValueError, AttributeError):
        return {}  # what is wrong with it, loading says


def _comparable(value: Any) -> Any:
    """Lists and tuples alike (YAML gives lists; a config may hold tuples)."""
    return list(value) if isinstance(value, (list, tuple)) else value


def _unused(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: Path, *, modules: Mapping[str, torch.nn.Module],
                    optimizers: Mapping[str, torch.optim.Optimizer], schedulers: Mapping[str, Any]) -> dict[str, Any]:
    """Restore modules, optimizers, schedulers and RNGs from `path`; return the trainer state.

    A checkpoint that passed `checkpoint_fault` and still fails to load does not fit this run (another
    model or optimizer than the one saved): a one-line error, since older checkpoints would not fit either."""
    try:
        return _load_checkpoint(path, modules=modules, optimizers=optimizers, schedulers=schedulers)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        # torch's loading errors put what failed on their second line ("...for LlamaForCausalLM:\n size mismatch").
        reason = " ".join(lines[:2] if lines and lines[0].endswith(":") else lines[:1]) or type(err).__name__
        raise RunDirError(f"cannot resume from this checkpoint: {reason}", file=str(path)) from err


def _load_checkpoint(path: Path, *, modules: Mapping[str, torch.nn.Module],
                     optimizers: Mapping[str, torch.optim.Optimizer], schedulers: Mapping[str, Any]) -> dict[str, Any]:
    for name, module in modules.items():
        load_module_weights(module, path / name)
    regrouped: dict[str, list[int]] = {}
    for name, optimizer in optimizers.items():
        tensors = load_file(str(path / f"optimizer-{name}.safetensors"))
        structure = json.loads((path / f"optimizer-{name}.json").read_text(encoding="utf-8"))
        saved, source = from_lr_keyed_groups(modules[name], optimizer, _unflatten_optimizer_state(tensors, structure))
        optimizer.load_state_dict(saved)
        if source is not None:
            regrouped[name] = source
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    for name, scheduler in schedulers.items():
        scheduler_state = state["schedulers"][name]
        if name in regrouped:  # its per-group lists follow the optimizer's groups
            scheduler_state = {key: [value[i] for i in regrouped[name]] if key in ("base_lrs", "_last_lr") else value
                               for key, value in scheduler_state.items()}
        scheduler.load_state_dict(scheduler_state)
    _restore_rng(load_file(str(path / "rng.safetensors")), state["rng"])
    return {"step": state["step"], **state["trainer"]}


def load_module_weights(module: torch.nn.Module, directory: Path, prefix: str = "") -> None:
    """Load weights saved by `save_pretrained` (a full model, or only a peft adapter) into `module`; with `prefix`,
    only the tensors whose names start with it, without it (the policy of an ActorCritic's checkpoint: "actor.")."""
    adapter = directory / "adapter_model.safetensors"
    # (a prefixed part of a whole module's tensors, an RL checkpoint's policy, holds its adapter's tensors inline)
    if adapter.is_file() != hasattr(module, "peft_config") and not (prefix and not adapter.is_file()):
        held, has = ("an adapter", "none") if adapter.is_file() else ("the whole model", "an adapter")
        raise ValueError(f"the checkpoint holds {held} and this run's model has {has}: resume with the adapter "
                         "settings (adapter.method) the run was started with")
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(module, load_file(str(adapter)))
        return
    weights = load_file(str(directory / "model.safetensors"))
    if prefix:
        weights = {name[len(prefix):]: tensor for name, tensor in weights.items() if name.startswith(prefix)}
    missing, unexpected = module.load_state_dict(weights, strict=False)
    tied = set(getattr(module, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied]:
        saved, wanted = _value_model(weights), _value_model(module.state_dict())
        if saved != wanted:  # PPO's critic: the settings that decide it, not forty tensor names
            raise ValueError(f"the checkpoint holds {saved} and this run's model has {wanted}: resume with the "
                             "critic settings the run was started with (critic.kind, advantage.estimator)")
        raise RuntimeError(f"checkpoint {directory} does not match the model: missing {missing}, "
                           f"unexpected {unexpected}")
    if missing and hasattr(module, "tie_weights"):
        module.tie_weights()


def _value_model(tensors: Mapping[str, Any]) -> str:
    """Which value model an ActorCritic's tensors (`models.value`) hold, by their names."""
    if any(name.startswith("critic.") for name in tensors):
        return "a separate critic"
    if any(name.startswith("value_head.") for name in tensors):
        return "a value head on the policy's trunk (critic.kind=shared)"
    return "no critic"


# ----------------------------------------------------------------------------------------------
# Optimizer state without pickle: tensors go to safetensors, everything else to JSON.


def _flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    per_param: dict[str, dict[str, Any]] = {}
    for param_id, values in state_dict["state"].items():
        entry: dict[str, Any] = {}
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{key}"] = value.detach().contiguous().cpu()
                entry[key] = {"tensor": f"{param_id}.{key}"}
            else:
                entry[key] = value
        per_param[str(param_id)] = entry
    return tensors, {"state": per_param, "param_groups": _jsonable(state_dict["param_groups"])}


def _unflatten_optimizer_state(tensors: dict[str, torch.Tensor], structure: dict[str, Any]) -> dict[str, Any]:
    state = {int(pid): {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
                        for k, v in entry.items()}
             for pid, entry in structure["state"].items()}
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in structure["param_groups"]]
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------------------------
# RNG states.


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    version, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return tensors, {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [version, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def _restore_rng(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    version, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((version, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ----------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    if callable(value):
        return None  # LambdaLR keeps its lambdas in the state dict; they are rebuilt, not saved
    return value


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
