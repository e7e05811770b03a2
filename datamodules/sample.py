"""``Sample``: the one record type every dataset reader yields, whatever the on-disk format."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


@dataclass
class Sample:
    """One training example in reading order.

    ``content`` interleaves text (``str``) and images (``PIL.Image.Image``) as they appear in the
    document (OBELICS page, caption pair, PDF page with its OCR text). For conversations (The
    Cauldron, Docmatix, text-only instruction data) ``content`` holds the images the conversation
    is about and ``turns`` the (user, assistant) pairs in order. ``source`` names the reader
    (``"obelics"``, ``"laion_coco"``, ...), ``key`` identifies the record: a reader yields its key
    inside the shard, a stream (``iter_samples``, the data module) makes it ``"<shard name>#<record
    key>"``, the shard named relative to its source's root (``sources.shard_names``): unique across
    a source and the same wherever the data is stored. ``meta`` keeps
    source-specific fields a filter or a notebook may want (URLs, scores, sizes).
    """

    source: str
    key: str
    content: list[str | Image.Image] = field(default_factory=list)
    turns: list[tuple[str, str]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def images(self) -> list[Image.Image]:
        """The images of ``content``, in order."""
        return [item for item in self.content if isinstance(item, Image.Image)]

    @property
    def text(self) -> str:
        """The text pieces of ``content`` joined by spaces (images left out)."""
        return " ".join(item for item in self.content if isinstance(item, str))
