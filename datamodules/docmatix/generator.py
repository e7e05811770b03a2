"""``CausalLMGenerator``: a local transformers causal LM as the ``Generate`` callable of the pipeline."""

from __future__ import annotations

from pathlib import Path


class CausalLMGenerator:
    """A transformers causal LM loaded from a local folder, as a ``Generate`` callable.

    ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained(path, local_files_only=True)``, never
    ``trust_remote_code``. Prompts go through the tokenizer's chat template (one user message,
    generation prompt added) when it has one, else are used as they are followed by a blank line.
    Greedy unless ``temperature > 0``; generation stops at EOS or a ``\\nEND`` line. A prompt whose
    tokens plus ``max_new_tokens`` exceed the model's context gives ``None``.
    """

    def __init__(
        self,
        path: str | Path,
        max_new_tokens: int = 1024,
        temperature: float = 0.0,
        top_p: float = 1.0,
        device: str | None = None,
        dtype: str = "auto",
        seed: int = 0,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = check_model_folder(path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=getattr(torch, dtype)
        )
        self.model.to(self.device).eval()
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.context = _context_length(self.model.config)
        torch.manual_seed(seed)

    def format_prompt(self, prompt: str) -> str:
        """``prompt`` as the model sees it: through the chat template if the tokenizer has one."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt + "\n\n"

    def __call__(self, prompts: list[str]) -> list[str | None]:
        """Generate one completion per prompt (one padded batch); ``None`` for prompts that do not fit."""
        import torch

        templated = bool(getattr(self.tokenizer, "chat_template", None))
        texts = [self.format_prompt(prompt) for prompt in prompts]
        lengths = [len(self.tokenizer(text, add_special_tokens=not templated).input_ids) for text in texts]
        fits = [self.context is None or n + self.max_new_tokens <= self.context for n in lengths]
        batch = [text for text, ok in zip(texts, fits) if ok]
        outputs: list[str] = []
        if batch:
            inputs = self.tokenizer(
                batch, return_tensors="pt", padding=True, add_special_tokens=not templated
            )
            inputs = inputs.to(self.device)
            sampling = self.temperature > 0
            options = {"temperature": self.temperature, "top_p": self.top_p} if sampling else {}
            with torch.no_grad():
                tokens = self.model.generate(
                    **inputs,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=sampling,
                    stop_strings=["\nEND"],
                    tokenizer=self.tokenizer,
                    pad_token_id=self.tokenizer.pad_token_id,
                    **options,
                )
            new = tokens[:, inputs["input_ids"].shape[1] :]
            outputs = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        generated = iter(outputs)
        return [next(generated) if ok else None for ok in fits]


def _context_length(config: object) -> int | None:
    """The longest sequence a model config allows (``max_position_embeddings``, GPT-2's ``n_positions``)."""
    for name in ("max_position_embeddings", "n_positions"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


def check_model_folder(path: str | Path) -> Path:
    """``path`` as a ``Path`` if it is a local folder with a ``config.json``, else ``FileNotFoundError``."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Model folder not found: {path} (expected a local folder saved with save_pretrained)."
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a transformers model folder.")
    return folder
