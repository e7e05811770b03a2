"""A tiny byte-level BPE tokenizer shipped with the package, for tests, notebooks and the CPU demo.

It is trained here, deterministically, on English-like text generated from word lists about the
demo's synthetic tasks (shapes, colours, counts, captions, questions and answers, ``User:`` /
``Assistant:`` turns), so those tasks tokenize into few tokens and nothing needs a download.
Digits are always split one per token. The Idefics special tokens (image placeholders,
``<end_of_utterance>``, Idefics3 ``<global-img>`` and ``<row_r_col_c>`` tile tags) are added
special tokens: single ids that are never split.

``python -m vlm.processing.tokenizer`` retrains it and rewrites ``vlm/assets/tiny-tokenizer``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from vlm.config import GLOBAL_IMAGE_TOKEN, RECIPE_SPECIAL_TOKENS
from vlm.processing.text import TILE_TAGS

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-tokenizer"
DEFAULT_VOCAB_SIZE = 2048

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
# In the order the released Idefics tokenizers added them (vlm.config.RECIPE_SPECIAL_TOKENS first).
IDEFICS_TOKENS = (*RECIPE_SPECIAL_TOKENS, GLOBAL_IMAGE_TOKEN, *TILE_TAGS)
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, *IDEFICS_TOKENS)

# --- corpus ---------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return text.split()


COLOURS = _words("red green blue yellow orange purple pink brown black white grey gray cyan magenta gold")
SHAPES = _words("circle square triangle rectangle star heart diamond hexagon pentagon oval cross arrow dot")
SIZES = _words("small large big tiny huge little medium tall short wide narrow long")
POSITIONS = [
    "above", "below", "left of", "right of", "next to", "inside", "behind", "in front of", "on top of",
    "under", "near", "far from", "between", "around", "at the center of", "in the corner of",
]  # fmt: skip
OBJECTS = _words(
    "cat dog bird horse cow sheep fish car bus train bike boat plane tree flower house road sign book "
    "table chair cup bottle phone laptop clock door window wall floor sky cloud sun moon ball box bag "
    "hat shirt shoe person man woman child girl boy people group kitchen room street city field beach "
    "mountain river lake park garden picture photo image chart graph table page document letter word "
    "text number digit label title menu receipt screen logo shelf plate pizza apple banana cake food"
)
COUNT_WORDS = _words("zero one two three four five six seven eight nine ten eleven twelve")
VERBS = _words(
    "is are has have shows contains holds sits stands lies runs walks flies looks reads writes says "
    "points moves turns draws colors counts finds sees makes takes gives uses"
)
ADJECTIVES = _words(
    "bright dark light old new round flat empty full open closed clear simple plain striped dotted "
    "happy busy quiet sunny cloudy wooden metal plastic glass paper first second third last other same"
)
FILLER = _words(
    "the a an this that these those there here it they he she we you I of in on at to from with for by "
    "and or but not no yes very also only just all some many much more most each every both few"
)
COMMON = _words(
    "time year people way day thing world life hand part eye place work week case point home water "
    "fact month lot right study night area mother father problem story money idea side head house "
    "friend power hour game line end member law car level face office door health person art war "
    "history party result change morning reason research girl guy moment air teacher force education "
    "foot boy age policy music market sense nation plan college interest death experience effect class "
    "control care field development role effort rate heart drug show leader light voice wife police "
    "mind price report decision son view relationship town road arm difference value building action "
    "model season society tax director position player record paper space ground form event official "
    "matter center couple site project activity star table need court oil situation cost industry "
    "figure street image phone data picture practice piece land product doctor wall patient worker news "
    "test movie north love support technology step baby computer type attention film tree source "
    "organization hair window evidence population floor summer example energy color colour shape size "
    "say get make go know take see come think look want give use find tell ask seem feel try leave call "
    "keep let begin help talk turn start show hear play run move like live believe hold bring happen "
    "write provide sit stand lose pay meet include continue set learn lead understand watch follow stop "
    "create speak read allow add spend grow open walk win offer remember consider appear buy wait serve "
    "die send expect build stay fall cut reach kill remain suggest raise pass sell require decide pull "
    "good great high different small large next early young important few public bad able late hard "
    "major better economic strong possible whole free military true federal international full special "
    "easy clear recent certain personal red difficult available likely short single medical current "
    "wrong private past foreign fine common poor natural significant similar hot dead central happy "
    "serious ready simple left physical general environmental financial final main green nice huge "
    "popular traditional cultural however about after again against because before during through "
    "until while above across along among behind beyond toward within without which what when where "
    "who whom whose why how than then now never always often sometimes usually perhaps maybe really "
    "still already almost enough quite rather"
)
DOC_WORDS = _words(
    "Title Table Figure Total Date Name Page Section Chapter Summary Price Amount Item Question Answer "
    "Caption Description percent average value year month day time report chart bar axis legend row "
    "column cell sum difference ratio increase decrease highest lowest"
)
QUESTIONS = [
    "What colour is the {shape}?", "What color is the {obj}?", "How many {shape}s are there?",
    "How many {colour} {shape}s are in the image?", "Where is the {colour} {shape}?",
    "Is there a {shape} in the image?", "Is the {shape} {colour}?", "What shape is {position} the {shape}?",
    "What is written in the image?", "What does the sign say?", "Read the text in the image.",
    "Describe the image.", "Describe this picture in one sentence.", "What is the {obj} doing?",
    "Which shape is {colour}?", "What is the total?", "What is the value for {year}?",
    "Count the {colour} shapes.", "What number is shown?", "What is the title of the {doc}?",
]  # fmt: skip
CAPTIONS = [
    "A {size} {colour} {shape} {position} a {colour2} {shape2}.",
    "There are {count} {colour} {shape}s on a {colour2} background.",
    "{count_cap} {shape}s and {count2} {shape2}s.", "A {adj} {obj} {verb} {position} the {obj2}.",
    "The {obj} {verb} a {colour} {obj2}.", "An image of {count} {size} {colour} {shape}s.",
    "The text reads \"{word} {number}\".", "{doc_cap}: {number} {unit}", "Page {number} of {number2}",
    "The {obj} is {colour} and the {obj2} is {colour2}.", "In {year}, the {doc} {verb} {number} {unit}.",
]  # fmt: skip
ANSWERS = [
    "{count}", "{colour}", "{shape}", "{number}", "Yes.", "No.", "Yes", "No", "{count_cap}.",
    "It is {colour}.", "The {shape} is {position} the {shape2}.", "There are {count}.", "{number} {unit}",
]  # fmt: skip
UNITS = _words("percent % dollars $ km cm kg items people points years")


def _fill(template: str, rng: random.Random) -> str:
    count, count2 = rng.choice(COUNT_WORDS), rng.choice(COUNT_WORDS)
    return template.format(
        colour=rng.choice(COLOURS),
        colour2=rng.choice(COLOURS),
        shape=rng.choice(SHAPES),
        shape2=rng.choice(SHAPES),
        size=rng.choice(SIZES),
        position=rng.choice(POSITIONS),
        obj=rng.choice(OBJECTS),
        obj2=rng.choice(OBJECTS),
        adj=rng.choice(ADJECTIVES),
        verb=rng.choice(VERBS),
        count=count,
        count2=count2,
        count_cap=count.capitalize(),
        number=rng.choice([rng.randint(0, 20), rng.randint(0, 10_000), round(rng.uniform(0, 100), 2)]),
        number2=rng.randint(1, 99),
        year=rng.randint(1950, 2030),
        unit=rng.choice(UNITS),
        word=rng.choice(DOC_WORDS).upper(),
        doc=rng.choice(["document", "chart", "table", "page", "receipt", "report"]),
        doc_cap=rng.choice(DOC_WORDS),
    )


def _free_sentence(rng: random.Random) -> str:
    pools = rng.choices(
        [FILLER, FILLER, COMMON, COMMON, OBJECTS, ADJECTIVES, VERBS, COLOURS, SHAPES, DOC_WORDS],
        k=rng.randint(4, 16),
    )
    # Inflections and capitals so that common word forms become single tokens too.
    words = [rng.choice(pool) + rng.choice(["", "", "", "", "s", "ing", "ed", "er", "ly"]) for pool in pools]
    words = [word.capitalize() if rng.random() < 0.1 else word for word in words]
    return " ".join(words).capitalize() + rng.choice([".", ".", "!", "?", ",", ";", ":"])


def corpus(n_lines: int = 20_000, seed: int = 0) -> Iterator[str]:
    """Yield ``n_lines`` deterministic training lines: captions, Q/A chat turns, numbers, free text."""
    rng = random.Random(seed)
    for _ in range(n_lines):
        kind = rng.random()
        if kind < 0.3:
            yield _fill(rng.choice(CAPTIONS), rng)
        elif kind < 0.6:
            question, answer = _fill(rng.choice(QUESTIONS), rng), _fill(rng.choice(ANSWERS), rng)
            # No space after "User:" is how a question reads right after an image placeholder.
            yield f"User:{rng.choice(['', ' '])}{question}\nAssistant: {answer}\n"
        elif kind < 0.7:
            integer, decimal = rng.randint(0, 10 ** rng.randint(1, 9)), rng.uniform(-1000, 1000)
            yield f"{integer} {decimal:.3f} {rng.randint(1, 12)}/{rng.randint(1, 28)}"
        else:
            yield _free_sentence(rng)


# --- build, save, load ----------------------------------------------------------------------


def train_tiny_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the tiny tokenizer from scratch on ``corpus()``; the same call always gives the same vocab."""
    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(), trainer=trainer)
    # A BOS token starts every sequence, as in the Mistral/Llama tokenizers of the released models.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, backend.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens=list(IDEFICS_TOKENS),
        clean_up_tokenization_spaces=False,
    )


def load_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Load the tiny tokenizer stored in the package assets (offline, no hub access)."""
    return PreTrainedTokenizerFast.from_pretrained(TINY_TOKENIZER_DIR)


def main() -> None:
    """Retrain the tiny tokenizer and rewrite the package assets."""
    tokenizer = train_tiny_tokenizer()
    tokenizer.save_pretrained(TINY_TOKENIZER_DIR)
    print(f"wrote {TINY_TOKENIZER_DIR} (vocabulary of {len(tokenizer)} tokens)")


if __name__ == "__main__":
    main()
