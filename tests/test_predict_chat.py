"""Inference on the CPU demo: ``lightning predict`` writes one answer per question to
``predictions.jsonl`` (the validation questions, or a JSON-lines question file), and ``python -m
runners.chat`` answers about an image in a subprocess, from a checkpoint or an exported folder, with the
same greedy answer as prediction and the conversation kept across turns."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_demo import DEMO, demo_args
from torch.utils.data import DistributedSampler

from callbacks import PredictionWriter
from datamodules import VLMDataModule
from datamodules.sources import iter_samples
from datamodules.synthetic_content import draw_scene, random_scene
from lit_modules import VLMModule
from runners.chat import Chat
from runners.cli import main
from runners.export import export
from vlm.hf import load_model_dir

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What shape is drawn?"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, Path]:
    """The demo trained for 3 steps: (its arguments' tmp folder, the checkpoint)."""
    tmp_path = tmp_path_factory.mktemp("demo")
    args = demo_args(tmp_path)
    args += [
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=3",
        "--trainer.enable_progress_bar=false",
        "--model.warmup_steps=1",
        "--model.lr=1e-6",
        "--model.min_lr=0",  # 3 steps at the demo's rate already answer "" (an immediate end of utterance)
        "--data.batch_size=4",
        "--data.val_batch_size=8",
    ]
    main(["fit", *args])
    return tmp_path, next(tmp_path.rglob("latest-step=3.ckpt"))


def predict(tmp_path: Path, ckpt: Path, out_dir: Path, *extra: str) -> list[dict]:
    main(
        [
            "predict",
            *demo_args(tmp_path),
            f"--trainer.default_root_dir={out_dir}",
            "--ckpt_path",
            str(ckpt),
            *extra,
        ]
    )
    return [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines()]


def chat(*args: str, stdin: str | None = None) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "runners.chat", "--max_new_tokens", "4", *args],
        input=stdin or "",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()


def test_predict_writes_one_answer_per_validation_question(demo_run, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["predict"])
    tmp_path, ckpt = demo_run
    records = predict(tmp_path, ckpt, tmp_path / "val_predictions")
    shards = sorted(str(p) for p in (tmp_path / "data" / "val" / "cauldron" / "clevr").glob("*.parquet"))
    samples = list(iter_samples("cauldron", shards))  # the demo's val_sources
    questions = {
        (*s.key.split("#", 1), f"{i}", user, answer)
        for s in samples
        for i, (user, answer) in enumerate(s.turns)
    }
    assert len(records) == len(questions) == 12
    got = {
        (r["shard"], *r["id"].rsplit("#", 1), r["prompt"].removeprefix("<image>"), r["reference"])
        for r in records
    }
    assert got == questions
    assert all(
        set(r) == {"id", "shard", "prompt", "answer", "reference"} and isinstance(r["answer"], str)
        for r in records
    )


def test_every_rank_reads_every_question_for_the_distributed_sampler(demo_run, monkeypatch):
    """Lightning's distributed sampler splits the (map-style) question dataset across ranks; the stream
    under it must not split too (rank 1 of 2 would keep a quarter of the questions)."""
    tmp_path, _ = demo_run
    shards = str(tmp_path / "data" / "val" / "cauldron" / "clevr" / "*.parquet")
    val_sources = [{"source": "cauldron", "urls": shards, "weight": 1.0, "max_seq_len": 80}]
    data = VLMDataModule(sources=val_sources, val_sources=val_sources, val_generate=True)
    monkeypatch.setattr("datamodules.datamodule.consumer_slot", lambda: (1, 2))  # rank 1 of 2
    assert len(data.predict_dataloader().dataset) == len(data.val_dataloader().dataset) == 12


def test_prediction_parts_merge_into_one_line_per_question_in_order(tmp_path):
    """Three ranks, seven questions: each rank's part holds what ``DistributedSampler`` deals it, the
    padding repeats included; the merged file has every question once, in dataset order."""
    records = [{"id": f"q{i}", "answer": str(i)} for i in range(7)]
    writer = PredictionWriter(str(tmp_path / "predictions.jsonl"))
    ranks = []
    for rank in range(3):
        indices = list(DistributedSampler(range(7), num_replicas=3, rank=rank, shuffle=False))
        trainer = SimpleNamespace(global_rank=rank, world_size=3, is_global_zero=rank == 0)
        writer.on_predict_start(trainer, None)
        for batch in (indices[:2], indices[2:]):  # batches of 2, then the rest
            prediction = [records[i] for i in batch]
            writer.write_on_batch_end(trainer, None, prediction, None, {"indices": batch}, 0, 0)
        ranks.append(indices)
    assert ranks[1] == [1, 4, 0] and ranks[2] == [2, 5, 1]  # padded with the first positions
    barrier = SimpleNamespace(barrier=lambda name: None)
    writer.on_predict_end(SimpleNamespace(world_size=3, is_global_zero=True, strategy=barrier), None)
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.jsonl"]  # parts removed


def test_question_file_prediction_and_chat_give_the_same_answer(demo_run, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["predict"])
    demo_tmp, ckpt = demo_run
    rng = random.Random(5)
    draw_scene(random_scene(rng), rng).save(tmp_path / "scene.png")
    lines = [
        {"id": "q1", "images": ["scene.png"], "question": QUESTION, "answer": "circle"},
        {"id": "q2", "images": [str(tmp_path / "scene.png")], "question": "How many shapes are there?"},
    ]
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    source = [{"source": "questions", "urls": str(tmp_path / "questions.jsonl")}]
    generation = {"max_new_tokens": 4, "stop_strings": ["\n"]}
    records = predict(
        demo_tmp,
        ckpt,
        tmp_path / "out",
        f"--data.predict_sources={json.dumps(source)}",
        f"--model.predict_generation={json.dumps(generation)}",
    )
    assert [r["id"] for r in records] == ["q1", "q2"]
    assert records[0]["reference"] == "circle" and "reference" not in records[1]
    answer = records[0]["answer"].strip()
    assert answer  # words: the chat must find the same ones

    image = str(tmp_path / "scene.png")
    assert chat("--ckpt_path", str(ckpt), "--stop", "\n", "--image", image, QUESTION) == [answer]
    turns = f"/image {image}\n{QUESTION}\nAnd how many are there?\n"
    replies = chat("--ckpt_path", str(ckpt), "--stop", "\n", stdin=turns)
    assert len(replies) == 2 and replies[0] == answer


def test_chat_keeps_the_conversation_and_reads_an_exported_folder(demo_run, tmp_path):
    _, ckpt = demo_run
    assert export(ckpt, tmp_path / "export", config=DEMO) == "vlm"  # mlp connector: no transformers class
    model, processor = load_model_dir(tmp_path / "export")
    rng = random.Random(5)
    image = draw_scene(random_scene(rng), rng)
    conversation = Chat(model, processor)
    first = conversation.ask(QUESTION, [image])
    conversation.ask("And how many are there?")
    assert [m["role"] for m in conversation.messages] == ["user", "assistant"] * 2
    assert conversation.messages[1]["content"][0]["text"] == first
    module = VLMModule.load_from_checkpoint(ckpt, weights_only=True)
    assert first == Chat(module.model, processor).ask(QUESTION, [image])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"line 2: not JSON"),
        ('{"id": 3, "images": []}', r'line 2: expected \{"id"'),
        ('{"id": 3, "images": "a.png", "question": "Q?"}', r"line 2: images must be a list"),
        ('{"id": 3, "images": ["missing.png"], "question": "Q?"}', r"line 2: .*missing\.png"),
    ],
)
def test_a_bad_question_line_is_an_error_naming_it(tmp_path, line, message):
    good = json.dumps({"id": "a", "question": "Text only?"})
    path = tmp_path / "questions.jsonl"
    path.write_text(f"{good}\n{line}\n")
    with pytest.raises(ValueError, match=message):
        list(iter_samples("questions", str(path)))


def test_prediction_without_questions_says_what_to_set():
    with pytest.raises(ValueError, match="predict_sources"):
        VLMDataModule([]).predict_dataloader()
