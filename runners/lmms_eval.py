"""An lmms-eval model (``idefics_lightning``) that scores any checkpoint of this codebase with that harness.

The prompt is built by the same code as our harness (``vlm.evaluation.batch``): each lmms-eval
context (the text the task's ``doc_to_text`` produced) becomes the user text of a
``prompts.PromptTurn`` with the request's images, in a ``PromptItem`` rendered with training's chat
template or, with ``chat=False``, as plain text for base models, and batched by ``collate_prompts``.
Generation and cutting are ``vlm.evaluation.scoring.PromptScorer``'s (without a metric: lmms-eval
scores): ``VLMModule.generate_answers`` (greedy, stops at eos / ``<end_of_utterance>``), then the text is
cut at the paper's stop words plus the task's ``until`` list. Images go
before the text unless the context places them with ``<image>`` (like lmms-eval's own ``idefics2``).

Loading: ``pretrained`` is a Lightning checkpoint (``.ckpt``) of ``lit_modules.VLMModule`` (its
hyper-parameters rebuild the model, as ``validate --ckpt_path``) or a transformers Idefics2/Idefics3
folder (``VLMModule(from_transformers=...)``, tokenizer from the same folder unless ``tokenizer``).
The processor is the model's (``vlm.processing.contract``: its tokenizer, recipe, fusion and visual
tokens per tile) with ``image_processor`` (a JSON object) as the image settings, as in
``configs/eval/*.yaml``; ``recipe`` / ``image_seq_len``, when given, must match the model.

Registration (lmms-eval 0.7.3 resolves ``--model NAME`` in ``lmms_eval.models.get_model`` through
``ModelRegistryV2``, which reads the entry-point group ``lmms_eval.models``): ``setup.cfg`` declares::

    [options.entry_points]
    lmms_eval.models =
        idefics_lightning = runners.lmms_eval:lmms_eval_manifest

and importing this module with lmms-eval installed also registers the class with
``lmms_eval.api.registry.register_model`` (the decorator lmms-eval's own models use; that legacy
``MODEL_REGISTRY`` is not what the 0.7.3 evaluator reads). The deprecated ``LMMS_EVAL_PLUGINS``
variable needs a ``<plugin>.models`` package layout and is not supported. Then::

    lmms-eval --model idefics_lightning --tasks textvqa_val --batch_size 8 --model_args \\
      'pretrained=CKPT,precision=bf16-mixed,image_processor=IMAGE'
    # IMAGE: a JSON object, e.g. {"longest_edge":980,"shortest_edge":378,"do_image_splitting":false}

or, without the entry point, ``lmms_eval.evaluator.simple_evaluate(model=IdeficsLightning(...), ...)``.
The Idefics2 VQA prompt (``prompts.VQA_TEMPLATE``) comes from a task whose ``doc_to_text`` returns
``pre_prompt + question + post_prompt`` with ``lmms_eval_prompt_kwargs("vqa")`` (lmms-eval picks a
task's ``lmms_eval_specific_kwargs`` by model name, so a task YAML can hold them under
``idefics_lightning:``); otherwise the task's own prompt text is used, in our chat template. (A task's
``doc_to_text`` may still alter the question: lmms-eval's ``textvqa`` capitalises it.)
``loglikelihood`` (lmms-eval's ``loglikelihood`` / ``multiple_choice`` tasks) is implemented: the summed
log-probability of the continuation's tokens after the same generation prompt, and whether it is greedy.

Limits: images only (no video or audio); greedy decoding only (sampling settings in the task's
``generation_kwargs`` are ignored with a warning, as our harness decodes greedily); lmms-eval's
few-shot contexts are text only (our harness's few-shot, with the shots' images as earlier chat turns,
is ``EvalDataModule(num_shots=...)``); ``generate_until_multi_round`` is not implemented. Under a
multi-process launch lmms-eval sets the rank and world size itself; each process takes the GPU of its
``LOCAL_RANK``. This module imports without lmms-eval (``LMMS_EVAL_AVAILABLE`` is then ``False`` and
the class is a plain object with the same methods).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lit_modules import VLMModule
from vlm.config import Recipe
from vlm.evaluation.batch import PromptBatch, PromptItem, collate_prompts, generation_inputs
from vlm.evaluation.prompts import STOP_WORDS, PromptTurn, format_prompt, plain_text, render_chat_text
from vlm.evaluation.scoring import PromptScorer
from vlm.language_model import resolve_path
from vlm.processing.contract import connect

try:
    from lmms_eval.api.model import lmms as _LMMSBase

    LMMS_EVAL_AVAILABLE = True
    LMMS_EVAL_IMPORT_ERROR: ImportError | None = None
except ImportError as error:  # lmms-eval not installed (or one of its imports missing)
    _LMMSBase = object
    LMMS_EVAL_AVAILABLE = False
    LMMS_EVAL_IMPORT_ERROR = error

MODEL_NAME = "idefics_lightning"
CLASS_PATH = f"{__name__}.IdeficsLightning"
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".wmv", ".m4v")
PRECISIONS = {"32-true": None, "32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def lmms_eval_manifest():
    """The ``lmms_eval.models`` entry-point payload: a ``ModelManifest`` naming ``IdeficsLightning`` as the
    simple (``doc_to_text``) implementation of ``idefics_lightning`` (lmms-eval imported only when called)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def lmms_eval_prompt_kwargs(kind: Literal["vqa"] = "vqa") -> dict[str, str]:
    """``pre_prompt`` / ``post_prompt`` with which an lmms-eval ``doc_to_text`` of the form
    ``pre_prompt + question + post_prompt`` gives our ``format_prompt(kind, question)`` (Idefics2 A.3.1)."""
    if kind != "vqa":  # multiple-choice tasks lay out their choices themselves: no pre/post pair fits
        raise ValueError(f"Only the 'vqa' prompt is a pre/post pair around the question, not {kind!r}.")
    marker = "\x00question\x00"
    pre, post = format_prompt(kind, marker).split(marker)
    return {"pre_prompt": pre, "post_prompt": post}


@dataclass
class _Request:
    """One lmms-eval request, unpacked: the prompt's documents and the generation settings."""

    documents: list[PromptTurn]
    until: list[str]
    max_new_tokens: int | None
    continuation: str | None = None


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [item for element in value for item in _as_list(element)]
    return [value]


def _check_images(images: list[Any]) -> list[Any]:
    for image in images:
        if isinstance(image, dict) or (
            isinstance(image, (str, os.PathLike)) and str(image).lower().endswith(VIDEO_SUFFIXES)
        ):
            raise ValueError(
                f"{MODEL_NAME} takes images only (PIL images, encoded bytes or image paths), "
                f"got {image!r:.80}."
            )
    return images


def load_module(pretrained: str, tokenizer: str | None = None):
    """A ``VLMModule`` in eval mode from a Lightning checkpoint file or a transformers Idefics2/Idefics3
    folder (``tokenizer``: ``None`` = the checkpoint's tokenizer, or the folder itself)."""
    path = Path(resolve_path(pretrained))
    if path.is_dir():
        module = VLMModule(from_transformers=str(path), tokenizer=tokenizer or str(path))
        module.configure_model()
    elif path.is_file():
        overrides = {} if tokenizer is None else {"tokenizer": tokenizer}
        module = VLMModule.load_from_checkpoint(path, map_location="cpu", **overrides)
    else:
        raise FileNotFoundError(
            f"pretrained={pretrained!r}: no such checkpoint file or transformers folder ({path})."
        )
    if module.tokenizer is None:
        raise ValueError(f"{pretrained!r} names no tokenizer: pass tokenizer=<path or hub name>.")
    return module.eval()


class IdeficsLightning(_LMMSBase):
    """lmms-eval model ``idefics_lightning``: a ``VLMModule`` prompted and decoded exactly as
    ``EvalDataModule`` + ``BenchmarkEvaluation`` do (see the module docstring).

    - ``pretrained``: a ``.ckpt`` of ``VLMModule`` or a transformers Idefics2/Idefics3 folder;
      ``tokenizer``: ``None`` (the checkpoint's / the folder's) or a path or hub name.
    - ``chat``: training's chat template (instruction models); ``False``: plain text (base models).
    - ``image_processor`` (``ImageProcessor`` keyword arguments, a dict or a JSON object string); the
      recipe, fusion and visual tokens per tile are the model's (``recipe`` / ``image_seq_len``, when
      given, must match them).
    - ``max_new_tokens``: used when the task's ``generation_kwargs`` give none (``None``: the module's
      ``val_max_new_tokens``).
    - ``precision``: ``32-true``, ``bf16-mixed`` or ``16-mixed`` (autocast, as the Lightning trainer's);
      ``device``: default ``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``.
    - ``batch_size``: requests per generation batch (left padded, as in our harness; same tokens).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        chat: bool = True,
        tokenizer: str | None = None,
        recipe: Recipe | None = None,
        image_seq_len: int | None = None,
        image_processor: dict[str, Any] | str | None = None,
        max_new_tokens: int | None = None,
        precision: str = "32-true",
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # passed by lmms-eval's evaluator; unused
    ) -> None:
        super().__init__()
        self._rank, self._world_size = 0, 1
        self.task_dict: dict[str, Any] = {}
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}; expected one of {sorted(PRECISIONS)}.")
        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise ValueError(f"batch_size={batch_size!r}: {MODEL_NAME} needs a fixed integer batch size.")
        if isinstance(image_processor, str):
            image_processor = json.loads(image_processor)
        self.chat, self.precision, self.batch_size_per_gpu = bool(chat), precision, int(batch_size)
        self.max_new_tokens = max_new_tokens
        if device is None:
            cuda = torch.cuda.is_available()
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
        self._device = torch.device(device)
        self.module = load_module(pretrained, tokenizer).to(self._device)
        given = {"recipe": recipe, "image_seq_len": image_seq_len}
        settings = connect(self.module, dict(image_processor or {}), given, prefix="model_args")
        self.processor = settings.processor(dict(image_processor or {}), self.module.tokenizer)
        self._warned_sampling = False

    # --- lmms-eval's model interface -----------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def tokenizer(self):
        return self.module.tokenizer

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Greedy answers to ``generate_until`` requests (``args = (context, generation_kwargs, doc_to_visual,
        doc_id, task, split)``), cut at ``prompts.STOP_WORDS`` and the request's ``until``; batches of
        ``batch_size`` requests with the same ``max_new_tokens``, answers in request order."""
        parsed = [self._parse(request) for request in requests]
        answers: list[str | None] = [None] * len(parsed)
        scorer = PromptScorer(MODEL_NAME, None, STOP_WORDS)
        for max_new_tokens, indices in self._groups(parsed):
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                items = [
                    (i, PromptItem(str(i), parsed[i].documents, stop_words=parsed[i].until)) for i in chunk
                ]
                batch = collate_prompts(items, self.processor, self.chat)
                records = scorer(batch, lambda b, n=max_new_tokens: self._generate(b, n))
                for i, record in zip(chunk, records):
                    answers[i] = record["prediction"]
        return answers

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """``(log p(continuation | prompt), whether greedy decoding gives the continuation)`` for each
        ``loglikelihood`` request (``args = (context, continuation or doc_to_target, doc_to_visual, doc_id,
        task, split)``). The prompt is the generation prompt (``prompt_batch``); the continuation's tokens
        are those of the prompt text followed by the continuation, after the prompt's tokens (lm-eval's
        rule), so a continuation ``" A"`` is scored as the tokens the model would produce after
        ``Assistant:`` (chat) or ``Answer:`` (plain). One request per forward pass."""
        results = []
        for request in requests:
            parsed = self._parse(request, loglikelihood=True)
            results.append(self._loglikelihood(parsed.documents, parsed.continuation))
        return results

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError(f"{MODEL_NAME} does not implement multi-round generation.")

    # --- the shared prompt path ----------------------------------------------------------------

    def documents(self, request: Any) -> list[PromptTurn]:
        """The documents of a request's prompt: one ``PromptTurn`` (the context as user text, the images)."""
        return self._parse(request, loglikelihood=request.request_type == "loglikelihood").documents

    def prompt_batch(self, documents: Sequence[list[PromptTurn]]) -> PromptBatch:
        """The ``PromptBatch`` of these prompts, as ``EvalDataModule`` builds it (``collate_prompts``)."""
        items = [(i, PromptItem(str(i), docs)) for i, docs in enumerate(documents)]
        return collate_prompts(items, self.processor, self.chat)

    def prompt_text(self, documents: list[PromptTurn]) -> str:
        """A prompt's text before image expansion (what ``collate_prompts`` records as ``prompts``)."""
        return render_chat_text(documents) if self.chat else plain_text(documents)

    def generate_raw(
        self, documents: Sequence[list[PromptTurn]], max_new_tokens: int | None = None
    ) -> list[str]:
        """``VLMModule.generate_answers`` on ``prompt_batch(documents)`` with ``max_new_tokens`` (``None``:
        the adapter's, else the module's ``val_max_new_tokens``), before stop words."""
        return self._generate(self.prompt_batch(documents), max_new_tokens)

    # --- helpers -----------------------------------------------------------------------------

    def _generate(self, batch: PromptBatch, max_new_tokens: int | None) -> list[str]:
        batch = self._to_device(batch)
        hparams = self.module.hparams
        saved = hparams.val_max_new_tokens
        hparams.val_max_new_tokens = max_new_tokens or self.max_new_tokens or saved
        try:
            with torch.inference_mode(), self._autocast():
                return self.module.generate_answers(batch)
        finally:
            hparams.val_max_new_tokens = saved

    def _parse(self, request: Any, loglikelihood: bool = False) -> _Request:
        args = request.args
        if len(args) != 6:
            raise ValueError(
                f"{MODEL_NAME} expects lmms-eval's 6 request arguments (context, generation_kwargs or "
                f"continuation, doc_to_visual, doc_id, task, split), got {len(args)}."
            )
        context, second, doc_to_visual, doc_id, task, split = args
        doc = None
        if callable(doc_to_visual) or (loglikelihood and callable(second)):
            doc = self.task_dict[task][split][doc_id]
        images = _check_images(_as_list(doc_to_visual(doc))) if callable(doc_to_visual) else []
        documents = [PromptTurn(images, context)]
        if loglikelihood:
            continuation = second(doc) if callable(second) else second
            return _Request(documents, [], None, str(continuation))
        gen_kwargs = dict(second or {})
        self._warn_sampling(gen_kwargs)
        until = [word for word in _as_list(gen_kwargs.get("until")) if word]
        max_new_tokens = gen_kwargs.get("max_new_tokens")
        return _Request(documents, until, None if max_new_tokens is None else int(max_new_tokens))

    @staticmethod
    def _groups(parsed: list[_Request]) -> Iterator[tuple[int | None, list[int]]]:
        groups: dict[int | None, list[int]] = {}
        for i, request in enumerate(parsed):
            groups.setdefault(request.max_new_tokens, []).append(i)
        return iter(groups.items())

    def _warn_sampling(self, gen_kwargs: dict[str, Any]) -> None:
        sampling = (
            bool(gen_kwargs.get("do_sample"))
            or float(gen_kwargs.get("temperature") or 0) > 0
            or int(gen_kwargs.get("num_beams") or 1) > 1
        )
        if sampling and not self._warned_sampling:
            warnings.warn(
                f"{MODEL_NAME} decodes greedily, as our harness: ignoring do_sample / temperature / "
                f"num_beams in {gen_kwargs}.",
                stacklevel=3,
            )
            self._warned_sampling = True

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self._device) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def _autocast(self):
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self._device.type, dtype=dtype)

    def _loglikelihood(self, documents: list[PromptTurn], continuation: str) -> tuple[float, bool]:
        batch = self.prompt_batch([documents])
        prompt_ids = batch["prompt_input_ids"][0]
        images = [image for doc in documents for image in doc.images]
        whole = self.processor([self.prompt_text(documents) + continuation], [images] if images else None)
        continuation_ids = whole["input_ids"][0, len(prompt_ids) :]
        if len(continuation_ids) == 0:
            return 0.0, True
        input_ids = torch.cat([prompt_ids, continuation_ids])[None]
        inputs = generation_inputs(batch)
        inputs.update(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        with torch.inference_mode(), self._autocast():
            logits = self.module(**self._to_device(inputs)).logits[0].float()
        n = len(prompt_ids)
        predicting = logits[n - 1 : n - 1 + len(continuation_ids)]  # position t predicts token t + 1
        targets = continuation_ids.to(predicting.device)
        logprob = torch.log_softmax(predicting, dim=-1).gather(1, targets[:, None]).sum()
        return float(logprob), bool(torch.equal(predicting.argmax(-1), targets))


if LMMS_EVAL_AVAILABLE:
    try:
        from lmms_eval.api.registry import register_model
    except ImportError as error:  # lmms_eval.api.registry imports `evaluate`
        LMMS_EVAL_IMPORT_ERROR = error
    else:
        IdeficsLightning = register_model(MODEL_NAME)(IdeficsLightning)
