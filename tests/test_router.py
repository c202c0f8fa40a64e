"""Router: the method's MLP shape, safetensors round trip, refusal of a mismatched input size."""

import json

import pytest
import torch

from pipeline import CiterError
from pipeline.router import Router, RouterSpec, load_router, save_router


def test_default_shape_matches_the_method():
    router = Router(RouterSpec(input_size=1536))
    n = sum(p.numel() for p in router.parameters())
    assert 9.4e6 < n < 9.5e6  # "about 9.5M parameters for d = 1536"
    kinds = [next(c.__name__ for c in type(m).__mro__ if c.__module__.startswith("torch")) for m in router.net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear", "Dropout", "Linear"]
    assert router.net[0].out_features == 3072 and router.net[4].out_features == 1536


def test_configurable_sizes_and_dropout():
    router = Router(RouterSpec(input_size=16, hidden_mults=(4.0,), dropout=0.3))
    assert router.net[0].out_features == 64 and router.net[3].p == 0.3 and router.net[-1].in_features == 64


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    router = Router(RouterSpec(input_size=32, dropout=0.2))
    router.train()
    router(torch.randn(64, 32))  # move the BatchNorm running statistics off their defaults
    router.eval()
    x = torch.randn(10, 32)
    save_router(router, tmp_path / "r", meta={"epoch": 3, "val_loss": 0.25})
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["config.json", "router.safetensors"]
    loaded = load_router(tmp_path / "r", expected_input_size=32)
    assert loaded.meta == {"epoch": 3, "val_loss": 0.25}
    assert loaded.router.spec == router.spec and not loaded.router.training
    assert torch.equal(loaded.router.prob(x), router.prob(x))
    assert ((loaded.router.prob(x) > 0) & (loaded.router.prob(x) < 1)).all()


def test_refuses_other_input_size_and_broken_files(tmp_path):
    save_router(Router(RouterSpec(input_size=32)), tmp_path / "r")
    with pytest.raises(CiterError, match="hidden states of size 32, but the SLM's hidden size is 48"):
        load_router(tmp_path / "r", expected_input_size=48)
    with pytest.raises(CiterError, match="not a router directory"):
        load_router(tmp_path / "nothing")
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    cfg["router"]["hidden_mults"] = [3.0, 1.0]
    (tmp_path / "r" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CiterError, match="weights do not fit the shape"):
        load_router(tmp_path / "r")


def test_truncated_weights_are_named_in_one_line(tmp_path):
    save_router(Router(RouterSpec(input_size=32)), tmp_path / "r")
    weights = tmp_path / "r" / "router.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CiterError, match=f"{weights}: damaged or missing router weights"):
        load_router(tmp_path / "r")


def test_features_widen_the_input_in_a_fixed_order_and_step_prob_reads_a_step():
    torch.manual_seed(0)
    spec = RouterSpec(input_size=8, features=("token_embedding", "hidden", "topk"), top_k=3, embedding_size=5)
    assert spec.features == ("hidden", "topk", "token_embedding") and spec.feature_size == 16
    router = Router(spec).eval()
    assert router.net[0].in_features == 16 and router.net[0].out_features == 16  # 2 x d, d = 8
    hidden, logits = torch.randn(4, 8), torch.randn(4, 11)
    embedding = torch.nn.Embedding(11, 5)
    tokens = logits.argmax(-1)
    # Built by hand: the hidden state, the 3 largest next-token probabilities (descending), the
    # greedy token's embedding.
    by_hand = torch.cat([hidden, torch.sort(torch.softmax(logits, -1), -1, descending=True).values[:, :3],
                         embedding.weight[tokens]], dim=-1)
    assert torch.allclose(router.step_features(hidden, logits, tokens, embedding), by_hand)
    assert torch.equal(router.step_prob(hidden, logits, tokens, embedding), router.prob(by_hand))


def test_hidden_sizes_replace_the_multipliers_and_an_old_router_config_still_loads(tmp_path):
    assert [m.out_features for m in Router(RouterSpec(input_size=8, widths=(5, 3))).net
            if isinstance(m, torch.nn.Linear)] == [5, 3, 1]
    assert [type(m).__name__ for m in Router(RouterSpec(input_size=8, widths=())).net] == ["Linear"]
    save_router(Router(RouterSpec(input_size=32)), tmp_path / "r")
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    cfg["router"] = {"input_size": 32, "hidden_mults": [2.0, 1.0], "dropout": 0.1}  # written before features
    (tmp_path / "r" / "config.json").write_text(json.dumps(cfg))
    assert load_router(tmp_path / "r").router.spec == RouterSpec(input_size=32)
    with pytest.raises(CiterError, match="router features must be distinct items of hidden, topk, token_embedding"):
        RouterSpec(input_size=8, features=("hidden", "logits"))
    with pytest.raises(CiterError, match="need top_k and embedding_size >= 1"):
        RouterSpec(input_size=8, features=("topk",))
