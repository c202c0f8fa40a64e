"""The router: an MLP giving P(the SLM's token is good enough) from what one SLM step has.

Its inputs (`features`, in this order whatever the config's order):
- `hidden`: the SLM's last hidden state (after the final norm), CITER's input;
- `topk`: the `top_k` largest probabilities of the SLM's next-token distribution, descending;
- `token_embedding`: the SLM's input embedding of its greedy token.
The last two are what R2R's router reads besides the hidden state. `Router.step_features`
assembles them from a step's hidden state, logits, greedy tokens and embedding module, for the
decoding engine (on the device, inside the step) and for teacher forcing alike, so training and
decoding see the same inputs.

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
from pipeline.config import ROUTER_FEATURES as FEATURES
from pipeline.storage import ObjectPath, StoragePath, run_path

WEIGHTS, CONFIG = "router.safetensors", "config.json"


@dataclass(frozen=True)
class RouterSpec:
    """What is needed to rebuild a router. `input_size` is the SLM's hidden size d; the hidden
    layers are `widths` when given, else `hidden_mults` times d. `top_k` and `embedding_size` are
    the widths of the `topk` and `token_embedding` features (0 when not used)."""

    input_size: int
    hidden_mults: tuple[float, ...] = (2.0, 1.0)
    dropout: float = 0.1
    features: tuple[str, ...] = ("hidden",)
    top_k: int = 0
    embedding_size: int = 0
    widths: tuple[int, ...] | None = None

    def __post_init__(self):
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown or not self.features or len(set(self.features)) != len(self.features):
            raise CiterError(f"router features must be distinct items of {', '.join(FEATURES)}, got "
                             f"{list(self.features)}")
        if "topk" in self.features and self.top_k < 1 or "token_embedding" in self.features and self.embedding_size < 1:
            raise CiterError(f"router features {list(self.features)} need top_k and embedding_size >= 1")
        object.__setattr__(self, "features", tuple(f for f in FEATURES if f in self.features))

    @property
    def hidden_sizes(self) -> list[int]:
        if self.widths is not None:
            return list(self.widths)
        return [max(1, round(m * self.input_size)) for m in self.hidden_mults]

    @property
    def feature_widths(self) -> dict[str, int]:
        """Each used feature's width, in input order."""
        widths = {"hidden": self.input_size, "topk": self.top_k, "token_embedding": self.embedding_size}
        return {f: widths[f] for f in self.features}

    @property
    def feature_size(self) -> int:
        return sum(self.feature_widths.values())


def step_features(features: tuple[str, ...], top_k: int, hidden: torch.Tensor, logits: torch.Tensor | None,
                  tokens: torch.Tensor | None, embedding: nn.Module | None) -> dict[str, torch.Tensor]:
    """Each requested feature at a set of positions, from the SLM's `hidden` states (n, d), its
    next-token `logits` (n, ids), its greedy `tokens` (n,) and its input `embedding` module."""
    out = {}
    if "hidden" in features:
        out["hidden"] = hidden
    if "topk" in features:
        out["topk"] = torch.softmax(logits.float(), dim=-1).topk(top_k, dim=-1).values
    if "token_embedding" in features:
        out["token_embedding"] = embedding(tokens)
    return out


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
    """Linear(f, 2d) -> BatchNorm -> ReLU -> Dropout -> Linear(2d, d) -> Dropout -> Linear(d, 1),
    f the features' width (d for the hidden state alone).

    `forward` returns logits of a feature vector; `prob` the probability that the SLM's token
    should be kept; `step_prob` the same from what an SLM step has.
    """

    def __init__(self, spec: RouterSpec):
        super().__init__()
        self.spec = spec
        layers: list[nn.Module] = []
        width = spec.feature_size
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
    def prob(self, x: torch.Tensor) -> torch.Tensor:
        """P(keep the SLM's token) for feature vectors `x` (n, f)."""
        dtype = self.net[0].weight.dtype
        return torch.sigmoid(self(x.to(dtype))).float()

    def step_features(self, hidden: torch.Tensor, logits: torch.Tensor | None = None,
                      tokens: torch.Tensor | None = None, embedding: nn.Module | None = None) -> torch.Tensor:
        """The feature vectors (n, f) of one SLM step: see `step_features`."""
        dtype = self.net[0].weight.dtype
        parts = step_features(self.spec.features, self.spec.top_k, hidden, logits, tokens, embedding)
        return torch.cat([parts[f].to(dtype) for f in self.spec.features], dim=-1)

    @torch.no_grad()
    def step_prob(self, hidden: torch.Tensor, logits: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                  embedding: nn.Module | None = None) -> torch.Tensor:
        """P(keep the SLM's token) at one SLM step, from its last hidden state (n, d), next-token
        logits (n, ids), greedy tokens (n,) and input embedding module; on the device, no host sync."""
        return self.prob(self.step_features(hidden, logits, tokens, embedding))


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
    spec = spec_dict(router.spec)
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
        spec = spec_from_dict(saved["router"])
    except (json.JSONDecodeError, KeyError, TypeError, CiterError) as e:
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


def spec_dict(spec: RouterSpec) -> dict[str, Any]:
    """A spec as plain JSON values (lists for tuples)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()}


def spec_from_dict(saved: dict[str, Any]) -> RouterSpec:
    """The inverse of `spec_dict`; a router saved before features existed reads the hidden state."""
    return RouterSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def router_spec(input_size: int, cfg: Any, top_k: int = 0, embedding_size: int = 0) -> RouterSpec:
    """A `RouterSpec` from the SLM's hidden size, a `RouterConfig` and the widths of the extra
    features as labelled (`top_k` is the config's, at most the vocabulary)."""
    return RouterSpec(input_size=input_size, hidden_mults=tuple(cfg.hidden_mults), dropout=cfg.dropout,
                      features=tuple(cfg.features), top_k=top_k if "topk" in cfg.features else 0,
                      embedding_size=embedding_size if "token_embedding" in cfg.features else 0,
                      widths=tuple(cfg.hidden_sizes) if cfg.hidden_sizes is not None else None)
