"""Model pair: the demo pair loads through the hub-model loader; mismatched tokenizers are refused."""

import json
import shutil

import pytest
import torch

from pipeline import CiterError
from pipeline.config import ModelsConfig, load_config
from pipeline.models import encode_prompts, flops_per_token, load_pair, load_tokenizer
from tests.conftest import DEMO_CONFIG, run_citer


def demo_models(world) -> ModelsConfig:
    return ModelsConfig(slm=str(world / "slm"), llm=str(world / "llm"))


def test_demo_pair_loads_like_a_hub_model(demo_world):
    pair = load_pair(demo_models(demo_world))
    assert type(pair.slm).__name__ == "LlamaForCausalLM" and not pair.slm.training
    assert pair.hidden_size == 48 and pair.llm.config.hidden_size == 128
    assert pair.slm.dtype == torch.float32 and pair.device.type == "cpu"
    assert flops_per_token(pair.llm) >= 10 * flops_per_token(pair.slm)
    tok = pair.tokenizer
    text = "What is 472+385?\n2+5+0=7:7 7+8+0=15:57 4+3+1=8:857 #### 857"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text  # one token per character, exact round trip
    assert tok.padding_side == "left" and tok.eos_token_id != tok.pad_token_id
    assert encode_prompts(tok, [text[:17]], chat_template=False) == [ids[:17]]


def test_dtype_from_config(demo_world):
    pair = load_pair(ModelsConfig(slm=str(demo_world / "slm"), llm=str(demo_world / "llm"), dtype="bfloat16"))
    assert pair.slm.dtype == torch.bfloat16 and pair.llm.dtype == torch.bfloat16


def mismatched_llm(demo_world, tmp_path):
    """A copy of the demo LLM whose tokenizer swaps the ids of '1' and '2'."""
    other = tmp_path / "llm"
    shutil.copytree(demo_world / "llm", other)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    vocab["1"], vocab["2"] = vocab["2"], vocab["1"]
    (other / "tokenizer.json").write_text(json.dumps(tj))
    return other


def test_tokenizer_mismatch_is_refused_with_how_they_differ(demo_world, tmp_path):
    other = mismatched_llm(demo_world, tmp_path)
    assert load_tokenizer(str(other))("1")["input_ids"] != load_tokenizer(str(demo_world / "llm"))("1")["input_ids"]
    with pytest.raises(CiterError) as e:
        load_pair(ModelsConfig(slm=str(demo_world / "slm"), llm=str(other)))
    assert "do not share a tokenizer" in str(e.value) and "2 tokens map to different ids" in str(e.value)


def test_cli_tokenizer_mismatch_exits_nonzero(demo_world, tmp_path):
    other = mismatched_llm(demo_world, tmp_path)
    proc = run_citer("eval", str(DEMO_CONFIG), f"models.llm={other}", f"--out={tmp_path / 'out'}")
    assert proc.returncode == 2 and "do not share a tokenizer" in proc.stderr
    assert not (tmp_path / "out" / "eval.json").exists()


def test_missing_model_and_empty_prompts_are_clear_errors(tmp_path):
    with pytest.raises(CiterError, match="no directory .*/none; not a hub id either"):
        load_pair(ModelsConfig(slm=str(tmp_path / "none"), llm=str(tmp_path / "none")))
    (tmp_path / "empty").mkdir()  # a directory, but no model in it
    with pytest.raises(CiterError, match="could not load the tokenizer of"):
        load_pair(ModelsConfig(slm=str(tmp_path / "empty"), llm=str(tmp_path / "empty")))
    with pytest.raises(CiterError, match="prompt list is empty"):
        encode_prompts(None, [], chat_template=False)


def test_remote_code_is_off_unless_asked():
    assert load_config(DEMO_CONFIG).models.trust_remote_code is False


def test_an_llm_left_partly_in_host_memory_by_too_few_gpus_is_refused_unless_asked(demo_world):
    """accelerate's own placement of the demo LLM on a GPU too small for it (as an actor reserving too
    few GPUs meets it): the modules it leaves on the CPU are refused, unless the map or
    models.llm_max_memory asked for the CPU."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.models import check_offload

    with init_empty_weights():
        llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(demo_world / "llm"))
    placed = infer_auto_device_map(llm, max_memory={0: "1MB", "cpu": "10GB"})
    assert 0 in placed.values() and "cpu" in placed.values()
    cfg = ModelsConfig(slm=str(demo_world / "slm"), llm=str(demo_world / "llm"), device="cuda",
                       llm_device_map="balanced")
    with pytest.raises(CiterError, match=r"models.llm_device_map='balanced' left \d+ of .*llm's modules in host "
                                         r"memory or on disk \(model.layers.0.mlp.up_proj, ...\)"):
        check_offload(cfg.llm, cfg, "balanced", placed)
    asked = ModelsConfig(**{**cfg.__dict__, "llm_max_memory": {"0": "1MB", "cpu": "10GB"}})
    check_offload(asked.llm, asked, "balanced", placed)
    check_offload(cfg.llm, cfg, {m: str(d) for m, d in placed.items()}, placed)  # an explicit map naming "cpu"
