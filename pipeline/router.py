"""The router: an MLP on the SLM's last hidden state giving P(the SLM's token is good enough).

Saved as `router.safetensors` + `config.json` in a directory; nothing is unpickled on load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, load_file, save_file
from torch import nn

from pipeline import CiterError
from pipeline.atomic import atomic_write_text, atomic_writer
from pipeline.storage import ObjectPath, StoragePath, run_path

WEIGHTS, CONFIG = "router.safetensors", "config.json"


@dataclass(frozen=True)
class RouterSpec:
    """What is needed to rebuild a router: input size, hidden multipliers, dropout."""

    input_size: int
    hidden_mults: tuple[float, ...] = (2.0, 1.0)
    dropout: float = 0.1

    @property
    def hidden_sizes(self) -> list[int]:
        return [max(1, round(m * self.input_size)) for m in self.hidden_mults]


class BatchNormFP32(nn.BatchNorm1d):
    """BatchNorm computed in fp32 whatever the input's dtype. Under bf16 training DeepSpeed casts
    parameters and keeps buffers, so the layer holds bf16 weights with fp32 running statistics,
    a mix CPU batch_norm refuses ("expected scalar type BFloat16 but found Float"). In fp32 it is
    nn.BatchNorm1d exactly (same call, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        out = nn.functional.batch_norm(x.float(), self.running_mean, self.running_var, weight, bias,
                                       self.training or not self.track_running_stats, self.momentum, self.eps)
        return out.to(x.dtype)


class Router(nn.Module):
    """Linear(d, 2d) -> BatchNorm -> ReLU -> Dropout -> Linear(2d, d) -> Dropout -> Linear(d, 1).

    `forward` returns logits; `prob` the probability that the SLM's token should be kept.
    """

    def __init__(self, spec: RouterSpec):
        super().__init__()
        self.spec = spec
        layers: list[nn.Module] = []
        width = spec.input_size
        for i, h in enumerate(spec.hidden_sizes):
            layers.append(nn.Linear(width, h))
            if i == 0:
                layers += [BatchNormFP32(h), nn.ReLU()]
            layers.append(nn.Dropout(spec.dropout))
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden).squeeze(-1)

    @torch.no_grad()
    def prob(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = self.net[0].weight.dtype
        return torch.sigmoid(self(hidden.to(dtype))).float()


@dataclass
class SavedRouter:
    """A loaded router and the metadata saved beside it (epoch, metrics, ...)."""

    router: Router
    meta: dict[str, Any] = field(default_factory=dict)


def save_router(router: Router, directory: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write `router.safetensors` then `config.json` (each via a temporary name and a rename)."""
    directory = run_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in router.state_dict().items()}
    with atomic_writer(directory / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    spec = asdict(router.spec)
    spec["hidden_mults"] = list(spec["hidden_mults"])
    atomic_write_text(directory / CONFIG, json.dumps({"router": spec, "meta": meta or {}}, indent=2))
    return directory


def load_router(directory: str | Path, expected_input_size: int | None = None,
                device: str | torch.device = "cpu") -> SavedRouter:
    """Load a router saved by `save_router`, in eval mode; refuse one whose input size does
    not match `expected_input_size` (the SLM's hidden size)."""
    directory = run_path(directory)
    cfg_path, weights = directory / CONFIG, directory / WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        raise CiterError(f"{directory}: not a router directory (expected {CONFIG} and {WEIGHTS})")
    try:
        saved = json.loads(cfg_path.read_text())
        spec = RouterSpec(**{**saved["router"], "hidden_mults": tuple(saved["router"]["hidden_mults"])})
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CiterError(f"{cfg_path}: not a router config ({type(e).__name__}: {e})") from None
    if expected_input_size is not None and spec.input_size != expected_input_size:
        raise CiterError(
            f"{directory}: the router reads hidden states of size {spec.input_size}, but the SLM's hidden "
            f"size is {expected_input_size}; it was trained for another SLM"
        )
    router = Router(spec)
    state = read_weights(weights, "router")
    try:
        router.load_state_dict(state)
    except RuntimeError as e:
        raise CiterError(f"{weights}: weights do not fit the shape in {CONFIG}: {e}") from None
    return SavedRouter(router=router.to(device).eval(), meta=saved.get("meta", {}))


def read_weights(path: str | StoragePath, what: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a missing or damaged file is a one-line CiterError."""
    path = run_path(path)
    try:
        return load(path.read_bytes()) if isinstance(path, ObjectPath) else load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError on a truncated or foreign file
        raise CiterError(f"{path}: damaged or missing {what} weights ({type(e).__name__}: {e})") from None


def router_spec(input_size: int, cfg: Any) -> RouterSpec:
    """A `RouterSpec` from the SLM's hidden size and a `RouterConfig`."""
    return RouterSpec(input_size=input_size, hidden_mults=tuple(cfg.hidden_mults), dropout=cfg.dropout)
