"""Configs: YAML + dotted overrides, validated with errors that name the key and the file."""

from pathlib import Path

import pytest

from pipeline import CiterError
from pipeline.config import Config, load_config, parse_override
from tests.conftest import DEMO_CONFIG, ROOT, run_citer


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


MINIMAL = """
models: {slm: a, llm: b}
task: {train_path: t.jsonl, eval_path: e.jsonl}
"""


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "jobs" / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert isinstance(cfg, Config) and cfg.name == path.stem


def test_demo_config_is_typed_and_defaults_fill_in():
    cfg = load_config(DEMO_CONFIG)
    assert cfg.demo is not None and cfg.models.slm.endswith("slm")
    assert cfg.eval.n_examples == 500 and cfg.train.num_workers == 2
    assert cfg.models.trust_remote_code is False


def test_overrides_are_typed_by_yaml_and_nested(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), [
        "eval.n_examples=7", "train.lr=0.5", "eval.thresholds=[0.2, 1]", "tracking.mode=offline",
        "task.fields.question=q", "deepspeed.extra.steps_per_print=5", "collect.n_examples=null",
    ])
    assert cfg.eval.n_examples == 7 and cfg.train.lr == 0.5
    assert cfg.eval.thresholds == [0.2, 1.0] and all(isinstance(t, float) for t in cfg.eval.thresholds)
    assert cfg.task.fields == {"question": "q"} and cfg.deepspeed.extra == {"steps_per_print": 5}
    assert cfg.tracking.mode == "offline" and cfg.collect.n_examples is None


def test_int_is_accepted_for_float_but_not_bool_for_int(tmp_path):
    assert load_config(write(tmp_path, MINIMAL), ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(CiterError, match="'eval.n_examples': expected int, got True"):
        load_config(write(tmp_path, MINIMAL), ["eval.n_examples=true"])


def test_unknown_key_in_file_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, MINIMAL + "eval: {n_exampels: 3}\n")
    with pytest.raises(CiterError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and "unknown key 'eval.n_exampels'" in msg and "did you mean 'eval.n_examples'" in msg


def test_unknown_key_from_override_says_so(tmp_path):
    with pytest.raises(CiterError, match=r"with command-line override\): unknown key 'train.epoch'"):
        load_config(write(tmp_path, MINIMAL), ["train.epoch=3"])


def test_wrong_type_missing_required_choice_and_range(tmp_path):
    with pytest.raises(CiterError, match="'eval.max_new_tokens': expected int, got 'many'"):
        load_config(write(tmp_path, MINIMAL + "eval: {max_new_tokens: many}\n"))
    with pytest.raises(CiterError, match=r"job.yaml: missing required key 'models.llm'"):
        load_config(write(tmp_path, "models: {slm: a}\ntask: {train_path: t, eval_path: e}\n"))
    with pytest.raises(CiterError, match="'models.dtype': 'fp8' is not one of: float32, bfloat16, float16"):
        load_config(write(tmp_path, MINIMAL), ["models.dtype=fp8"])
    with pytest.raises(CiterError, match=r"'collect.threshold': 1.5 must be in \[0.0, 1.0\]"):
        load_config(write(tmp_path, MINIMAL), ["collect.threshold=1.5"])
    with pytest.raises(CiterError, match=r"'eval.thresholds\[1\]': expected float"):
        load_config(write(tmp_path, MINIMAL), ["eval.thresholds=[0.1, x]"])


def test_bad_files_and_bad_override_syntax(tmp_path):
    with pytest.raises(CiterError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(CiterError, match="not valid YAML"):
        load_config(write(tmp_path, "models: [unclosed\n"))
    with pytest.raises(CiterError, match="expected KEY.SUB=VALUE"):
        parse_override("train.epochs")
    with pytest.raises(CiterError, match="'models' .* is not a section"):
        load_config(write(tmp_path, "models: 3\n"), ["models.slm=x"])


def test_cli_bad_key_is_one_paragraph_and_nonzero_exit():
    proc = run_citer("eval", str(DEMO_CONFIG), "eval.n_exampels=3")
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith("citer: error:") and "\n" not in err
    assert "unknown key 'eval.n_exampels'" in err and "demo.yaml" in err


@pytest.mark.parametrize("override, message", [
    ("router.features=[hidden, logits]", "'router.features[1]': 'logits' is not one of: hidden, topk, token_embedding"),
    ("router.features=[]", "'router.features': expected distinct items, at least one, got []"),
    ("router.features=[topk, topk]", "'router.features': expected distinct items, at least one"),
    ("router.hidden_sizes=[64, 0]", "'router.hidden_sizes[1]': 0 must be >= 1"),
    ("router.top_k=0", "'router.top_k': 0 must be >= 1"),
    ("collect.audit_rate=1.5", "'collect.audit_rate': 1.5 must be in [0.0, 1.0]"),
    ("eval.refine_steps=-1", "'eval.refine_steps': -1 must be >= 0"),
    ("eval.bootstrap_resamples=10", "'eval.bootstrap_resamples': 10 must be >= 100"),
    ("eval.length_buckets=0", "'eval.length_buckets': 0 must be >= 1"),
])
def test_evidence_keys_are_validated_in_one_line(tmp_path, override, message):
    with pytest.raises(CiterError) as e:
        load_config(write(tmp_path, MINIMAL), [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_router_features_and_sizes_load():
    cfg = load_config(DEMO_CONFIG, ["router.features=[token_embedding, hidden]", "router.hidden_sizes=[]"])
    assert cfg.router.features == ["token_embedding", "hidden"] and cfg.router.hidden_sizes == []
    assert load_config(DEMO_CONFIG).router.hidden_sizes is None  # the multipliers apply
