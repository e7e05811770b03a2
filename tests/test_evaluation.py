"""Benchmark evaluation (``vlm.evaluation``): prompts, readers of the Hub layouts, few-shot selection, and
the Lightning path (``EvalDataModule`` + ``BenchmarkEvaluation``) end to end on miniature fake benchmarks
with a random idefics2-tiny model, through the Python API and ``runners.cli.main(["validate", ...])``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer

from callbacks import BenchmarkEvaluation
from datamodules import EvalDataModule
from lit_modules import VLMModule
from runners.cli import main
from vlm.config import IMAGE_TOKEN
from vlm.evaluation import (
    BENCHMARKS,
    apply_stop_words,
    documents,
    format_prompt,
    get_benchmark,
    select_shots,
    write_fake_benchmark,
)
from vlm.evaluation.batch import collate_prompts
from vlm.evaluation.benchmarks import Example
from vlm.evaluation.fakes import MAKERS
from vlm.evaluation.fewshot import shot_answer
from vlm.evaluation.prompts import plain_text, render_chat_text
from vlm.processing.text import apply_chat_template, turns_to_messages

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "eval"
TINY_DATA = {
    "tokenizer": "tiny",
    "image_seq_len": 8,
    "image_processor": {"longest_edge": 64, "shortest_edge": 32},
}


@pytest.fixture(scope="module")
def fakes(tmp_path_factory) -> Path:
    """``root/<benchmark>/<split>-00000-of-00001.parquet``: 6 evaluation rows and 6 support ("train") rows."""
    root = tmp_path_factory.mktemp("benchmarks")
    for name in BENCHMARKS:
        write_fake_benchmark(name, root / name, 6)
        write_fake_benchmark(name, root / name, 6, split="train", seed=1)
    return root


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # much faster for the tiny model on shared cores
    yield
    torch.set_num_threads(threads)


def files(root: Path, name: str, split: str | None = None) -> str:
    return str(root / name / f"{split or get_benchmark(name).split}-*.parquet")


def tiny_module(fusion: str = "autoregressive") -> VLMModule:
    torch.manual_seed(0)
    return VLMModule(model="idefics2-tiny", fusion=fusion, tokenizer="tiny", val_max_new_tokens=6)


def evaluate(root: Path, name: str, out: Path, fusion: str = "autoregressive", **data) -> BenchmarkEvaluation:
    callback = BenchmarkEvaluation(output_dir=str(out))
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    datamodule = EvalDataModule(name, files(root, name), **{**TINY_DATA, **data})
    logged = trainer.validate(tiny_module(fusion), datamodule=datamodule, verbose=False)
    assert datamodule.processor.fusion == fusion  # fusion=None: the model's
    key = f"eval/{name}/{get_benchmark(name).metric_name}"
    assert logged[0][key] == pytest.approx(callback.results["value"])
    return callback


# --- prompts ------------------------------------------------------------------------------------


def test_prompts_are_the_papers():
    """Idefics2 appendix A.3.1, character for character."""
    assert format_prompt("vqa", "What is written?") == "Question: What is written?\nGive a very brief answer."
    assert format_prompt("multiple_choice", "Which?", ["cat", "dog", "cow"]) == (
        "Question: Which?\nChoices:\nA. cat\nB. dog\nC. cow\nAnswer with the letter."
    )
    assert apply_stop_words(" blue\nQuestion: what") == "blue"
    assert apply_stop_words("A<end_of_utterance>\nUser: hi") == "A"
    assert apply_stop_words("  a red square ") == "a red square"


def test_chat_prompt_is_the_training_template(fakes):
    """The few-shot chat prompt is the training conversation (the shots as earlier turns) cut right after
    ``Assistant:``, as text and as token ids with expanded images."""
    dm = EvalDataModule(
        "textvqa", files(fakes, "textvqa"), files(fakes, "textvqa", "train"), num_shots=2, **TINY_DATA
    )
    index, item = dm.dataset()[0]
    docs = item.documents
    shots = select_shots(dm.examples[0], dm.support, 2, 0)
    turns = [(IMAGE_TOKEN + format_prompt("vqa", s.question), s.answers[0]) for s in shots]
    turns.append((IMAGE_TOKEN + format_prompt("vqa", dm.examples[0].question), "blue"))
    training_text = apply_chat_template(turns_to_messages(turns))
    prompt = render_chat_text(docs)
    assert prompt.endswith("Give a very brief answer.<end_of_utterance>\nAssistant:")
    assert training_text == prompt + " blue<end_of_utterance>\n"
    images = [[image for s in [*shots, dm.examples[0]] for image in s.images]]
    training = dm.processor.encode_conversations([turns_to_messages(turns)], images)
    batch = collate_prompts([(index, item)], dm.processor, chat=True)
    n = batch["prompt_input_ids"].shape[1]
    assert torch.equal(batch["prompt_input_ids"][0], training["input_ids"][0, :n])
    assert dm.processor.tokenizer.decode(training["input_ids"][0, n:]).strip() == "blue<end_of_utterance>"
    assert torch.equal(batch["prompt_pixel_values"], training["pixel_values"])


def test_plain_prompt_for_base_models(fakes):
    ex = get_benchmark("vqav2").read(files(fakes, "vqav2"))
    text = plain_text(documents(ex[0], ex[1:3], "vqa"))
    shot = f"{IMAGE_TOKEN}Question: What colour is the square?\nGive a very brief answer.\nAnswer:"
    assert text == f"{shot} {ex[1].answers[0]}\n{shot} {ex[2].answers[0]}\n{shot}"


# --- readers and few-shot -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_reader_reads_the_hub_layout(fakes, name):
    examples = get_benchmark(name).read(files(fakes, name))
    assert len(examples) == (5 if name == "mmmu" else 6)  # MMMU: one open question skipped
    for ex in examples:
        assert ex.images and all(isinstance(image, bytes) for image in ex.images)
        assert ex.answers and ex.id
        text = format_prompt(get_benchmark(name).prompt, ex.question, ex.choices)
        assert text.count(IMAGE_TOKEN) in (0, len(ex.images))
        if ex.choices:
            gold = ex.choices["ABCD".index(ex.answers[0])]
            assert gold.endswith(("red", "green", "blue", "yellow"))
    assert len({ex.id for ex in examples}) == len(examples)


def test_mmmu_images_follow_their_references(fakes):
    examples = get_benchmark("mmmu").read(files(fakes, "mmmu"))
    twice = [ex for ex in examples if ex.question.count(IMAGE_TOKEN) == 2]
    assert twice and all(len(ex.images) == 2 and ex.images[0] == ex.images[1] for ex in twice)
    assert all("<image 1>" not in ex.question for ex in examples)


def test_few_shot_selection_is_seeded_and_excludes_the_query():
    support = [Example(str(i), [], f"q{i}", [], ["a"]) for i in range(20)]
    query = support[3]
    shots = select_shots(query, support, 8, seed=0)
    assert len(shots) == 8 and len({s.id for s in shots}) == 8 and query not in shots
    assert shots == select_shots(query, list(support), 8, seed=0)
    assert shots != select_shots(query, support, 8, seed=1)
    assert select_shots(support[4], support, 8, seed=0) != shots  # each query its own shots
    assert select_shots(query, support, 0, seed=0) == []
    with pytest.raises(ValueError, match="support split"):
        select_shots(query, support, 20, seed=0)


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_every_benchmark_end_to_end(fakes, name, tmp_path):
    """Zero-shot chat prompts on each fake benchmark: the logged score is the metric of the written
    predictions, one JSONL line per example."""
    callback = evaluate(fakes, name, tmp_path, batch_size=3)
    benchmark = get_benchmark(name)
    lines = (tmp_path / f"{name}_predictions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    examples = benchmark.read(files(fakes, name))
    assert [r["id"] for r in records] == [ex.id for ex in examples]
    assert all(r["prompt"].startswith("User:") and r["prompt"].endswith("Assistant:") for r in records)
    assert all(r["prediction"] == apply_stop_words(r["generation"]) for r in records)
    metric = benchmark.metric()
    benchmark.update(metric, [r["prediction"] for r in records], examples)
    results = json.loads((tmp_path / f"{name}_results.json").read_text())
    assert results["value"] == pytest.approx(float(metric.compute()), nan_ok=True)
    assert results["num_examples"] == len(examples) and results["metric"] == benchmark.metric_name
    assert callback.results == results


@pytest.mark.parametrize(
    ("fusion", "chat"), [("autoregressive", True), ("autoregressive", False), ("cross_attention", True)]
)
def test_batched_evaluation_equals_batch_size_one(fakes, tmp_path, fusion, chat):
    """Left-padded batches of 4 give the same greedy generations as one example at a time (few-shot, so
    the prompts differ in length), for chat and plain prompts and both fusions (the data module takes
    the model's)."""
    data = {"support_files": files(fakes, "textvqa", "train"), "num_shots": 2, "chat": chat}
    one = evaluate(fakes, "textvqa", tmp_path / "one", fusion, batch_size=1, **data)
    four = evaluate(fakes, "textvqa", tmp_path / "four", fusion, batch_size=4, **data)
    assert len({len(r["prompt"]) for r in one.records}) > 1 and any(r["generation"] for r in one.records)
    assert [r["generation"] for r in one.records] == [r["generation"] for r in four.records]
    assert one.results["value"] == four.results["value"]


class Oracle(VLMModule):
    """Generates each example's most frequent reference, then a stop word and more text."""

    def generate_answers(self, batch: dict) -> list[str]:
        examples = [self.trainer.datamodule.examples[i] for i in batch["indices"]]
        return [f" {shot_answer(ex)}\nQuestion: what else?" for ex in examples]


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_right_answers_get_full_marks(fakes, name, tmp_path):
    """The metric plumbing: reference answers (an MCQ's letter, AI2D's index as a letter, VQA's majority
    answer) cut at the stop word score 1 (CIDEr: a reference caption scores well above 0)."""
    callback = BenchmarkEvaluation(output_dir=str(tmp_path))
    trainer = Trainer(accelerator="cpu", logger=False, callbacks=[callback], enable_progress_bar=False)
    datamodule = EvalDataModule(name, files(fakes, name), batch_size=4, **TINY_DATA)
    trainer.validate(Oracle(model="idefics2-tiny"), datamodule=datamodule, verbose=False)
    assert callback.results["value"] > 1.0 if name == "coco" else callback.results["value"] == 1.0


def cli_validate(out: Path, name: str, *extra: str, tiny_model: bool = True) -> dict:
    """``python -m lightning validate --config configs/eval/<name>.yaml`` in-process with the tiny processor
    (and, with ``tiny_model``, the tiny model); the config's ``${EVAL_DATA}`` file pattern finds the fakes."""
    model = ["--model.model", "idefics2-tiny", "--model.tokenizer", "tiny"] if tiny_model else []
    args = [
        "validate", "--config", str(CONFIGS / f"{name}.yaml"), "--trainer.accelerator", "cpu",
        "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(out), *model,
        "--data.tokenizer", "tiny", "--data.image_seq_len", "8",
        "--data.image_processor", json.dumps(TINY_DATA["image_processor"]), "--data.batch_size", "2", *extra,
    ]  # fmt: skip
    torch.manual_seed(0)
    cli = main(args)
    results = sorted(out.glob(f"{name}/version_*/{name}_results.json"))
    assert len(results) == 1
    predictions = results[0].parent / f"{name}_predictions.jsonl"
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    return {"cli": cli, "results": json.loads(results[0].read_text()), "records": records}


@pytest.mark.parametrize("name", ["textvqa", "ai2d"])
def test_cli_validate_zero_and_few_shot(fakes, name, tmp_path, monkeypatch):
    monkeypatch.setenv("EVAL_DATA", str(fakes))
    monkeypatch.setattr(sys, "argv", ["lightning"])
    zero = cli_validate(tmp_path / "zero", name)
    assert zero["results"]["num_examples"] == 6 and zero["results"]["num_shots"] == 0
    assert zero["results"]["max_new_tokens"] == 16  # the config's, on the callback
    few = cli_validate(
        tmp_path / "few", name, "--data.num_shots", "2", "--data.chat", "false",
        "--data.support_files", files(fakes, name, "train"), "--data.limit", "4",
    )  # fmt: skip
    assert few["results"]["num_shots"] == 2 and not few["results"]["chat"]
    assert [r["id"] for r in few["records"]] == [r["id"] for r in zero["records"][:4]]
    assert all(
        r["prompt"].count(IMAGE_TOKEN) == 3 and r["prompt"].endswith("Answer:") for r in few["records"]
    )
    logged = few["cli"].trainer.callback_metrics[f"eval/{name}/{get_benchmark(name).metric_name}"]
    assert float(logged) == pytest.approx(few["results"]["value"])


def test_cli_validate_a_checkpoint(fakes, tmp_path, monkeypatch):
    """``validate --config configs/eval/textvqa.yaml --ckpt_path CKPT``: the model comes from the checkpoint
    (its hyper-parameters and weights), and the predictions are those of the Python API."""
    monkeypatch.setenv("EVAL_DATA", str(fakes))
    monkeypatch.setattr(sys, "argv", ["lightning"])
    callback = BenchmarkEvaluation(output_dir=str(tmp_path / "api"), max_new_tokens=16)
    trainer = Trainer(accelerator="cpu", logger=False, callbacks=[callback], enable_progress_bar=False)
    module = tiny_module()
    trainer.validate(module, datamodule=EvalDataModule("textvqa", files(fakes, "textvqa"), **TINY_DATA))
    trainer.save_checkpoint(tmp_path / "tiny.ckpt")
    # A module built by LightningCLI (``fit --config ...``) records its class path in the hyper-parameters,
    # which ``validate --ckpt_path`` reads; this one was built in Python, so add it.
    checkpoint = torch.load(tmp_path / "tiny.ckpt", weights_only=False)
    checkpoint["hyper_parameters"]["_class_path"] = "lit_modules.VLMModule"
    torch.save(checkpoint, tmp_path / "tiny.ckpt")
    cli = cli_validate(
        tmp_path / "cli", "textvqa", "--ckpt_path", str(tmp_path / "tiny.ckpt"), tiny_model=False
    )
    assert cli["cli"].model.hparams.model == "idefics2-tiny"
    assert [r["generation"] for r in cli["records"]] == [r["generation"] for r in callback.records]


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.stem)
def test_every_eval_config_fits_its_benchmark(config):
    """Each ``configs/eval/<b>.yaml`` (all built like the two the CLI test runs) names benchmark ``<b>``,
    reads its evaluation split, and its data and callback arguments are accepted."""
    parsed = yaml.safe_load(config.read_text())
    data = parsed["data"]["init_args"]
    benchmark = get_benchmark(config.stem)
    assert (
        data["benchmark"] == benchmark.name
        and parsed["trainer"]["logger"]["init_args"]["name"] == benchmark.name
    )
    assert data["files"] == f"${{EVAL_DATA}}/{benchmark.name}/{benchmark.split}-*.parquet"
    assert EvalDataModule(**data).benchmark is benchmark
    (callback,) = parsed["trainer"]["callbacks"]
    assert callback["class_path"] == "callbacks.BenchmarkEvaluation"
    BenchmarkEvaluation(**callback["init_args"])
