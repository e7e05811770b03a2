"""The lmms-eval adapter (``runners.lmms_eval``): a checkpoint of a random idefics2-tiny model,
scored through lmms-eval-style requests, gets the prompts (text and token ids) of ``EvalDataModule`` and of
training's chat template, and the generations of ``BenchmarkEvaluation``; the name ``idefics_lightning``
resolves through lmms-eval's registries. The requests are real ``lmms_eval.api.instance.Instance`` objects
(lmms-eval is part of the README's install: ``pip install -e ".[lmms-eval]"`` and
``pip install --no-deps lmms-eval==0.7.3``)."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from PIL import Image
from test_evaluation import TINY_DATA, files, tiny_module

from callbacks import BenchmarkEvaluation
from datamodules import EvalDataModule
from runners.lmms_eval import (
    CLASS_PATH,
    LMMS_EVAL_AVAILABLE,
    LMMS_EVAL_IMPORT_ERROR,
    MODEL_NAME,
    IdeficsLightning,
    lmms_eval_prompt_kwargs,
)
from vlm.config import END_OF_UTTERANCE_TOKEN, IMAGE_TOKEN
from vlm.evaluation import (
    STOP_WORDS,
    apply_stop_words,
    documents,
    format_prompt,
    get_benchmark,
    write_fake_benchmark,
)
from vlm.processing.text import apply_chat_template, turns_to_messages

INSTALL = 'pip install -e ".[lmms-eval]" && pip install --no-deps lmms-eval==0.7.3'
if not LMMS_EVAL_AVAILABLE:
    raise ImportError(f"lmms-eval is not importable ({LMMS_EVAL_IMPORT_ERROR}); install it: {INSTALL}")

from lmms_eval.api.instance import Instance  # noqa: E402

MAX_NEW_TOKENS = 16
UNTIL = ["ASSISTANT:"]  # lmms-eval's textvqa generation_kwargs
CASES = [("textvqa", True), ("textvqa", False), ("ai2d", True)]


def request(kind: str, args: tuple, doc_id: int, task: str):
    return Instance(
        request_type=kind, arguments=args, idx=0, metadata={"task": task, "doc_id": doc_id, "repeats": 1}
    )


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("benchmarks")
    for name in ("textvqa", "ai2d"):
        write_fake_benchmark(name, root / name, 6)
    return root


@pytest.fixture(scope="module")
def checkpoint(bench, tmp_path_factory) -> Path:
    """A ``VLMModule`` checkpoint as ``fit`` writes it (with LightningCLI's ``_class_path``)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(
        tiny_module(), datamodule=EvalDataModule("textvqa", files(bench, "textvqa"), limit=1, **TINY_DATA)
    )
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    saved["hyper_parameters"]["_class_path"] = "lit_modules.VLMModule"
    torch.save(saved, path)
    return path


def adapter(pretrained, chat: bool = True, **kwargs) -> IdeficsLightning:
    options = dict(
        tokenizer=None,
        image_seq_len=TINY_DATA["image_seq_len"],
        image_processor=TINY_DATA["image_processor"],
        device="cpu",
        batch_size=4,
    )
    return IdeficsLightning(str(pretrained), chat=chat, **{**options, **kwargs})


@pytest.fixture(scope="module")
def adapters(checkpoint) -> dict[bool, IdeficsLightning]:
    return {chat: adapter(checkpoint, chat) for chat in (True, False)}


def lmms_task(bench: Path, name: str, model: IdeficsLightning, gen_kwargs: dict | None = None) -> list:
    """``generate_until`` requests as an lmms-eval task makes them: the context is the question text its
    ``doc_to_text`` produced, the images come from ``doc_to_visual`` on the task's documents (PIL images,
    as ``datasets`` decodes them), which the evaluator puts in ``model.task_dict``."""
    benchmark = get_benchmark(name)
    examples = benchmark.read(files(bench, name))
    docs = [{"images": [Image.open(io.BytesIO(b)) for b in ex.images], "example": ex} for ex in examples]
    task = f"fake_{name}"
    model.task_dict[task] = {"test": docs}
    kwargs = {"until": UNTIL, "max_new_tokens": MAX_NEW_TOKENS} if gen_kwargs is None else gen_kwargs
    requests = []
    for i, ex in enumerate(examples):
        context = documents(ex, [], benchmark.prompt)[-1].text
        args = (context, dict(kwargs), lambda doc: doc["images"], i, task, "test")
        requests.append(request("generate_until", args, i, task))
    return requests


def harness(bench: Path, name: str, chat: bool, checkpoint: Path, out: Path) -> BenchmarkEvaluation:
    """Our harness on the same checkpoint: ``validate --ckpt_path`` with ``BenchmarkEvaluation``."""
    callback = BenchmarkEvaluation(output_dir=str(out), max_new_tokens=MAX_NEW_TOKENS)
    trainer = Trainer(accelerator="cpu", logger=False, callbacks=[callback], enable_progress_bar=False)
    datamodule = EvalDataModule(name, files(bench, name), chat=chat, batch_size=3, **TINY_DATA)
    trainer.validate(tiny_module(), datamodule=datamodule, ckpt_path=str(checkpoint), verbose=False)
    return callback


def test_vqa_prompt_kwargs_give_the_papers_prompt():
    kwargs = lmms_eval_prompt_kwargs("vqa")
    assert kwargs == {"pre_prompt": "Question: ", "post_prompt": "\nGive a very brief answer."}
    assert kwargs["pre_prompt"] + "What is it?" + kwargs["post_prompt"] == format_prompt("vqa", "What is it?")
    with pytest.raises(ValueError, match="vqa"):
        lmms_eval_prompt_kwargs("multiple_choice")


@pytest.mark.parametrize(("name", "chat"), CASES)
def test_prompts_are_the_harness_and_the_training_template(bench, adapters, name, chat):
    """The adapter's batch (text before image expansion, token ids, pixels) is ``EvalDataModule``'s for the
    same questions; with ``chat`` each prompt is training's conversation cut after ``Assistant:``."""
    model = adapters[chat]
    requests = lmms_task(bench, name, model)
    ours = model.prompt_batch([model.documents(r) for r in requests])
    datamodule = EvalDataModule(name, files(bench, name), chat=chat, batch_size=len(requests), **TINY_DATA)
    (theirs,) = list(datamodule.val_dataloader())
    assert sorted(ours) == sorted(theirs)  # the same PromptBatch; references and records are the harness'
    assert "prompt_pixel_values" in ours
    assert ours["prompts"] == theirs["prompts"] and ours["questions"] == theirs["questions"]
    for key, value in theirs.items():
        assert not isinstance(value, torch.Tensor) or torch.equal(ours[key], value), key
    for i, example in enumerate(datamodule.examples):
        docs = model.documents(requests[i])
        text = IMAGE_TOKEN + format_prompt(get_benchmark(name).prompt, example.question, example.choices)
        if not chat:
            assert ours["prompts"][i] == text + "\nAnswer:"
            continue
        answer = example.answers[0]
        turns = turns_to_messages([(text, answer)])
        assert apply_chat_template(turns) == ours["prompts"][i] + f" {answer}{END_OF_UTTERANCE_TOKEN}\n"
        training = datamodule.processor.encode_conversations([turns], [example.images])
        prompt_ids = model.prompt_batch([docs])["prompt_input_ids"][0]  # one prompt: no padding
        n = len(prompt_ids)
        assert torch.equal(prompt_ids, training["input_ids"][0, :n])
        rest = model.processor.tokenizer.decode(training["input_ids"][0, n:]).strip()
        assert rest == f"{answer}{END_OF_UTTERANCE_TOKEN}"


@pytest.mark.parametrize(("name", "chat"), CASES)
def test_generations_are_the_harness_predictions(bench, adapters, checkpoint, tmp_path, name, chat):
    """``generate_until`` (batches of 4, then 2) answers what ``BenchmarkEvaluation`` predicts (batches of 3)
    with the same checkpoint, prompts and stop words."""
    model = adapters[chat]
    answers = model.generate_until(lmms_task(bench, name, model))
    reference = harness(bench, name, chat, checkpoint, tmp_path)
    predictions = [record["prediction"] for record in reference.records]
    assert answers == predictions
    assert all(isinstance(a, str) for a in answers)
    if name == "textvqa":  # not a trivial match (the untrained model answers all the ai2d prompts alike)
        assert len(set(predictions)) > 1


def test_until_words_cut_the_generation(bench, adapters):
    """The task's ``until`` list cuts the text, on top of the paper's stop words."""
    model = adapters[True]
    requests = lmms_task(bench, "textvqa", model, {"max_new_tokens": MAX_NEW_TOKENS})
    raw = model.generate_raw([model.documents(r) for r in requests], MAX_NEW_TOKENS)
    answers = model.generate_until(requests)
    assert answers == [apply_stop_words(text, STOP_WORDS) for text in raw]
    i, answer = next((i, a) for i, a in enumerate(answers) if len(a) >= 3)
    stop = answer[-2:]
    args = list(requests[i].args)
    args[1] = {"max_new_tokens": MAX_NEW_TOKENS, "until": [stop, ""]}  # an empty word cuts nothing
    (cut,) = model.generate_until([request("generate_until", tuple(args), i, args[4])])
    assert cut == apply_stop_words(raw[i], [*STOP_WORDS, stop]) and len(cut) < len(answer)


def test_loglikelihood_is_the_sum_of_next_token_log_probs(bench, adapters):
    """Against one forward pass per continuation token on the growing prefix: the log-probability and
    whether greedy decoding gives the continuation (the greedy tokens themselves, then another answer)."""
    model = adapters[True]
    (gen,) = lmms_task(bench, "textvqa", model)[:1]
    context, _, doc_to_visual, doc_id, task, split = gen.args
    docs = model.documents(gen)
    batch = model.prompt_batch([docs])
    prompt_ids = batch["prompt_input_ids"][0]
    images = {k[len("prompt_") :]: v for k, v in batch.items() if k.startswith("prompt_pixel")}
    images.update({k[len("prompt_") :]: v for k, v in batch.items() if k.startswith("prompt_tiles")})
    tokenizer = model.processor.tokenizer

    def step_logprobs(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits = model.module(input_ids=ids[None], attention_mask=torch.ones_like(ids[None]), **images)
        return torch.log_softmax(logits.logits[0, -1].float(), -1)

    greedy = prompt_ids
    for _ in range(3):
        greedy = torch.cat([greedy, step_logprobs(greedy).argmax()[None]])
    greedy_text = tokenizer.decode(greedy[len(prompt_ids) :])
    continuations = [greedy_text, " blue", " A"]
    targets = [*continuations, lambda doc: " blue"]  # lmms-eval also passes doc_to_target itself
    requests = [
        request("loglikelihood", (context, c, doc_to_visual, doc_id, task, split), 0, task) for c in targets
    ]
    results = model.loglikelihood(requests)
    for (logprob, is_greedy), continuation in zip(results, [*continuations, " blue"]):
        whole = model.processor([model.prompt_text(docs) + continuation], [docs[0].images])["input_ids"][0]
        assert torch.equal(whole[: len(prompt_ids)], prompt_ids)  # the prompt's tokens are a prefix
        target = whole[len(prompt_ids) :]
        expected, all_greedy = 0.0, True
        for j, token in enumerate(target):
            step = step_logprobs(torch.cat([prompt_ids, target[:j]]))
            expected += float(step[token])
            all_greedy &= bool(step.argmax() == token)
        assert logprob == pytest.approx(expected, abs=1e-4) and is_greedy == all_greedy
    assert torch.equal(
        model.processor([model.prompt_text(docs) + greedy_text], [docs[0].images])["input_ids"][0], greedy
    )
    assert results[0][1] and not results[1][1] and results[1] == results[3]


def test_transformers_folder_gives_the_same_answers(bench, adapters, checkpoint, tmp_path):
    """The checkpoint exported with ``vlm.hf.to_transformers`` (LoRA adapters of the default training policy
    merged first; plus its tokenizer) and loaded as a folder."""
    from vlm.hf import to_transformers

    module = copy.deepcopy(adapters[True].module)
    assert module.merge_adapters() > 0
    to_transformers(module.model).save_pretrained(tmp_path)
    module.tokenizer.save_pretrained(tmp_path)
    folder = adapter(tmp_path)
    assert folder.module.hparams.from_transformers == str(tmp_path)
    requests = lmms_task(bench, "textvqa", folder)
    assert folder.generate_until(requests) == adapters[True].generate_until(requests)


def test_registered_with_lmms_eval(checkpoint, tmp_path, monkeypatch):
    """``--model idefics_lightning`` resolves: lmms-eval's own startup (``_initialize_model_registry``:
    built-in models, then the ``lmms_eval.models`` entry points) finds the class through the entry point that
    ``setup.cfg`` declares (written here as an installed distribution's metadata), the legacy
    ``register_model`` registry has it, and ``create_from_arg_string`` (how the evaluator builds it from
    ``--model_args``) parses the adapter's arguments."""
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import get_model
    from lmms_eval.models import _initialize_model_registry

    assert issubclass(IdeficsLightning, lmms) and IdeficsLightning.is_simple
    assert get_model(MODEL_NAME) is IdeficsLightning
    dist = tmp_path / "idefics_lightning_plugin-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: idefics-lightning-plugin\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(
        f"[lmms_eval.models]\n{MODEL_NAME} = runners.lmms_eval:lmms_eval_manifest\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = _initialize_model_registry()
    resolved = registry.resolve(MODEL_NAME)
    assert (resolved.model_type, resolved.class_path) == ("simple", CLASS_PATH)
    assert registry.get_model_class(MODEL_NAME) is IdeficsLightning
    builtin = registry.resolve("idefics2").class_path  # lmms-eval's own models are still there
    assert builtin == "lmms_eval.models.simple.idefics2.Idefics2"
    image_processor = json.dumps(TINY_DATA["image_processor"])
    arg_string = f"pretrained={checkpoint},chat=false,image_seq_len=8,image_processor={image_processor}"
    built = IdeficsLightning.create_from_arg_string(
        arg_string, {"batch_size": 2, "device": "cpu", "max_batch_size": None}
    )
    assert not built.chat and built.batch_size == 2 and built.device == torch.device("cpu")
    assert built.processor.image_seq_len == 8 and built.processor.image_processor.longest_edge == 64
    assert built.module.hparams.model == "idefics2-tiny" and built.processor.fusion == "autoregressive"
