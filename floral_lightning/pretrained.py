"""Models out of a run, without Lightning.

* :func:`save_pretrained` / :func:`load_pretrained`: the whole federated model (the base network, the C
  adaptors of every adapted layer, every client's mixture logits, and the options that rebuild it) as a
  folder: ``config.json`` (plain JSON) and ``model.safetensors`` (the tensors). Loading needs only torch,
  safetensors and this package's plain-PyTorch core.
* :func:`save_client_model`: one client's personalised network (a plain copy of the base architecture with
  its mixture folded into the weights) as a ``torch.save`` file of the module, and its ``state_dict`` beside.

The base network is rebuilt from a spec ``{"class_path": "pkg.Class", "init_args": {...}}`` (nested specs in
``init_args`` are built first), the form the CLI configs use; a network built in Python has no spec, and its
folder is loaded by passing the same architecture as ``base=``, as with PEFT's ``from_pretrained``.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .model import FloralModel

FORMAT = "floral-lightning"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

__all__ = ["build_module", "load_pretrained", "save_client_model", "save_pretrained"]


def _import(class_path: str) -> Any:
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"class_path={class_path!r} cannot be imported ({err})") from err


def _is_spec(value: Any) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("class_path"), str)


def build_module(spec: Mapping[str, Any]) -> nn.Module:
    """Instantiate ``{"class_path": ..., "init_args": {...}}``; init args that are specs are built first."""
    if not _is_spec(spec):
        raise ValueError(f"expected a module spec {{'class_path': 'pkg.Class', 'init_args': {{...}}}}, got {spec!r}")
    unknown = set(spec) - {"class_path", "init_args", "dict_kwargs"}
    if unknown:
        raise ValueError(f"module spec has unknown key(s) {sorted(unknown)}; valid: class_path, init_args")
    args = {**(spec.get("init_args") or {}), **(spec.get("dict_kwargs") or {})}
    args = {k: build_module(v) if _is_spec(v) else v for k, v in args.items()}
    module = _import(spec["class_path"])(**args)
    if not isinstance(module, nn.Module):
        raise TypeError(f"class_path={spec['class_path']!r} built a {type(module).__name__}, not an nn.Module")
    return module


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename over ``path``: a reader never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_pretrained(model: nn.Module, folder: str | os.PathLike, base: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` to ``folder``: a :class:`FloralModel` (kind ``floral``) or a plain network (``plain``,
    e.g. FedAvg). ``base`` is the spec of the base network (``None``: :func:`load_pretrained` needs ``base=``)."""
    from safetensors.torch import save_file

    if base is not None and not _is_spec(base):
        raise ValueError(f"base={base!r}: expected a spec {{'class_path': ..., 'init_args': {{...}}}} or None")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION, "base": base}
    if isinstance(model, FloralModel):
        config |= {"kind": "floral", "floral": model.options}
    else:
        config |= {"kind": "plain"}
    # clones: safetensors refuses tensors that share memory, and wants them contiguous on the CPU
    tensors = {name: t.detach().cpu().clone().contiguous() for name, t in model.state_dict().items()}
    _atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    text = json.dumps(config, indent=2) + "\n"
    _atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return folder


def load_pretrained(folder: str | os.PathLike, base: nn.Module | None = None) -> nn.Module:
    """The model written by :func:`save_pretrained`: a :class:`FloralModel` (or the plain network), in eval mode.

    ``base`` is a freshly built base network; by default it is built from the folder's spec.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {str(folder)!r}: not a folder written by save_pretrained")
    config = json.loads(config_path.read_text())
    if config.get("format") != FORMAT or config.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_path}: format {config.get('format')!r} version {config.get('version')!r}; "
            f"this version reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    if base is None:
        if config["base"] is None:
            raise ValueError(
                f"{config_path} has no spec of the base network (it was built in Python); pass the same "
                "architecture, freshly built: load_pretrained(folder, base=MyNet(...))"
            )
        base = build_module(config["base"])
    if config["kind"] == "floral":
        model = FloralModel(base, **config["floral"])
    elif config["kind"] == "plain":
        model = base
    else:
        raise ValueError(f"{config_path}: kind={config['kind']!r}; expected 'floral' or 'plain'")
    model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
    return model.eval()


def save_client_model(model: nn.Module, path: str | os.PathLike) -> tuple[Path, Path]:
    """Save a client's personalised network with ``torch.save``: the module at ``path`` (load it with
    ``torch.load(path, weights_only=False)``) and its ``state_dict`` at ``<path stem>.state_dict.pt``
    (load that into the same architecture with ``weights_only=True``). Returns both paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_path = path.with_name(path.stem + ".state_dict.pt")
    model = model.cpu().eval()
    _atomic_write(path, lambda tmp: torch.save(model, tmp))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _atomic_write(state_path, lambda tmp: torch.save(state, tmp))
    return path, state_path
