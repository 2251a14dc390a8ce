"""Atomic checkpoints with everything needed to resume bitwise identically on CPU.

Layout of `checkpoints/step-N/` (no pickle anywhere: tensors in safetensors, the rest in JSON):
  <module>/                HF format (model.safetensors + config.json, or a peft adapter)
  optimizer-<name>.safetensors + optimizer-<name>.json   tensors / structure of the optimizer state
  state.json               step, scheduler states, RNG states (python, numpy), trainer and data state
  rng.safetensors          torch CPU (and CUDA) generator states
  config.yaml              the run's resolved config
  COMPLETE                 written last; a directory without it is never loaded

A checkpoint is written to `.tmp-step-N/` and renamed into place, and older ones are deleted only
after the new one is complete, so a crash or SIGKILL mid-save leaves the previous one loadable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

COMPLETE = "COMPLETE"


def save_checkpoint(root: Path, step: int, *, modules: Mapping[str, torch.nn.Module],
                    optimizers: Mapping[str, torch.optim.Optimizer], schedulers: Mapping[str, Any],
                    trainer_state: dict[str, Any], config_text: str, keep_last: int) -> Path:
    """Write `root/step-<step>/` atomically and prune to the newest `keep_last` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, module in modules.items():
        module.save_pretrained(str(tmp / name), safe_serialization=True)
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
    _fsync_tree(tmp)
    (tmp / COMPLETE).write_text(str(step), encoding="utf-8")
    _fsync_tree(tmp)
    if final.exists():  # a re-save of the same step (e.g. a stop right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / COMPLETE).is_file() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: Path, *, modules: Mapping[str, torch.nn.Module],
                    optimizers: Mapping[str, torch.optim.Optimizer], schedulers: Mapping[str, Any]) -> dict[str, Any]:
    """Restore modules, optimizers, schedulers and RNGs from `path`; return the trainer state."""
    for name, module in modules.items():
        load_module_weights(module, path / name)
    for name, optimizer in optimizers.items():
        tensors = load_file(str(path / f"optimizer-{name}.safetensors"))
        structure = json.loads((path / f"optimizer-{name}.json").read_text(encoding="utf-8"))
        optimizer.load_state_dict(_unflatten_optimizer_state(tensors, structure))
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    for name, scheduler in schedulers.items():
        scheduler.load_state_dict(state["schedulers"][name])
    _restore_rng(load_file(str(path / "rng.safetensors")), state["rng"])
    return {"step": state["step"], **state["trainer"]}


def load_module_weights(module: torch.nn.Module, directory: Path) -> None:
    """Load weights saved by `save_pretrained` (a full model, or only a peft adapter) into `module`."""
    adapter = directory / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(module, load_file(str(adapter)))
        return
    weights = load_file(str(directory / "model.safetensors"))
    missing, unexpected = module.load_state_dict(weights, strict=False)
    tied = set(getattr(module, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied]:
        raise RuntimeError(f"checkpoint {directory} does not match the model: missing {missing}, "
                           f"unexpected {unexpected}")
    if missing and hasattr(module, "tie_weights"):
        module.tie_weights()


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
