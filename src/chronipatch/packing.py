"""Best-fit-decreasing sequence packing for padding-free causal-LM fine-tuning.

`PackingCollator` packs tokenized examples into rows of at most `max_length` tokens with best-fit decreasing
(`bfd_pack`) and emits the rows concatenated as a single `[1, total_tokens]` sequence with `position_ids` that
restart at every document, plus the `cu_seq_lens_*` / `max_length_*` keyword arguments that transformers'
varlen (flash) attention consumes. There is no `attention_mask`: chronipatch's varlen attention and flash
attention read `cu_seq_lens_*`; stock eager/sdpa infer the boundaries from `position_ids`, but only when the
model builds no KV cache (`use_cache=False`), otherwise documents silently see each other.
"""

from __future__ import annotations

import bisect
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["PackingCollator", "PackingStats", "bfd_pack"]

_LONG_DOCUMENT_MODES = ("split", "truncate")


def bfd_pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Pack items of the given lengths into rows of capacity `max_length` by best-fit decreasing.

    Items are visited longest first (ties by index); each goes into the open row with the least remaining
    capacity that still fits it, else into a new row. Returns the rows in creation order, each a list of item
    indices in placement order. Runs in O(n log n) comparisons.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    for i, n in enumerate(lengths):
        if not 1 <= n <= max_length:
            raise ValueError(f"length of item {i} is {n}, outside [1, max_length={max_length}]")
    rows: list[list[int]] = []
    # Open rows keyed as (remaining << 32) | row: one sorted list of ints, so a single bisect finds the row
    # with the smallest remaining capacity >= length, ties going to the oldest row.
    keys: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        pos = bisect.bisect_left(keys, n << 32)
        if pos < len(keys):
            key = keys.pop(pos)
            remaining, row = key >> 32, key & 0xFFFFFFFF
        else:
            remaining, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        remaining -= n
        if remaining > 0:  # full rows can never take another item (lengths are >= 1)
            bisect.insort(keys, (remaining << 32) | row)
    return rows


@dataclass
class PackingStats:
    """Counters accumulated over `PackingCollator` calls (per process: DataLoader workers keep their own)."""

    examples: int = 0  # examples handed to the collator
    documents: int = 0  # documents emitted (an example split in k fragments counts k)
    rows: int = 0  # rows of at most max_length tokens built by BFD
    tokens: int = 0  # tokens emitted
    capacity: int = 0  # rows * max_length
    truncated_tokens: int = 0  # tokens dropped by long_documents="truncate"
    split_documents: int = 0  # examples longer than max_length that were cut into fragments
    supervised_tokens: int = 0  # labels != ignore_index after masking document starts

    @property
    def fill_ratio(self) -> float:
        return self.tokens / self.capacity if self.capacity else 0.0

    @property
    def documents_per_row(self) -> float:
        return self.documents / self.rows if self.rows else 0.0

    def as_dict(self, prefix: str = "packing/") -> dict[str, int | float]:
        """Counters and derived ratios as a flat dict, keys prefixed for a trainer's logger."""
        out: dict[str, int | float] = dict(asdict(self))
        out["fill_ratio"] = self.fill_ratio
        out["documents_per_row"] = self.documents_per_row
        return {prefix + k: v for k, v in out.items()}

    def reset(self) -> None:
        for name, value in asdict(PackingStats()).items():
            setattr(self, name, value)


def _as_1d_long(value: Any, key: str, index: int, bools: bool = False) -> torch.Tensor:
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as e:  # strings, ragged nested lists, ...
        raise ValueError(f"example {index}: {key!r} is not a sequence of integers ({e})") from None
    # Token ids and labels are integers; casting floats or bools would change them silently. A mask may be
    # bool (True = 1).
    wrong = t.is_floating_point() or t.is_complex() or (t.dtype == torch.bool and not bools)
    if t.numel() and wrong:  # [] is float
        raise ValueError(f"example {index}: {key!r} must hold integers, got {t.dtype}")
    t = t.long()
    if t.ndim != 1:
        raise ValueError(f"example {index}: {key!r} must be 1-D, got shape {tuple(t.shape)}")
    return t


def _an_int(value: Any, rule: str, least: int | None = None) -> int:
    """``value`` as a Python int (numpy's too), or ValueError stating ``rule``: bools are not counts."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or (least is not None and value < least)
    ):
        raise ValueError(f"{rule}, got {value!r}")
    return int(value)


@dataclass
class PackingCollator:
    """Collate examples into one padding-free packed sequence of shape `[1, total_tokens]`.

    Each example is a mapping with `input_ids` and optionally `labels` (`ignore_index` = not supervised)
    and/or `completion_mask` (1 = supervised; where both are given, tokens with mask 0 are unsupervised too).
    Without either, every token is supervised. Tokens an `attention_mask` marks 0 (a tokenizer's padding) are
    dropped: packed rows need no padding. Every `window` examples (all of them if None) are packed by
    best-fit decreasing into rows of at most `max_length` tokens; rows are laid out one after another.
    Examples longer than `max_length` are either split into `max_length`-token fragments, each its own
    document (so each fragment's first label is masked too), or truncated to their first `max_length`
    tokens, the dropped tokens being counted in `stats`.

    Returns `input_ids`, `labels`, `position_ids` (LongTensor `[1, T]`), `cu_seq_lens_q`/`cu_seq_lens_k`
    (int32 `[num_docs + 1]`) and `max_length_q`/`max_length_k` (Python int: `max_length`, the bound every
    document keeps, so a compiled model sees the same value for every batch). The label of every document's
    first token is `ignore_index`: after the causal shift it would be predicted from the previous document.
    `last_row_offsets` holds the token offsets of the rows of the last batch (`[0, ..., T]`).
    """

    max_length: int
    window: int | None = None
    long_documents: str = "split"
    ignore_index: int = -100
    stats: PackingStats = field(default_factory=PackingStats)
    last_row_offsets: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        # numpy's ints too, kept as Python ints (as max_length_q/k must be)
        self.max_length = _an_int(self.max_length, "max_length must be an int >= 2", least=2)
        if self.window is not None:
            self.window = _an_int(self.window, "window must be None or an int >= 1", least=1)
        self.ignore_index = _an_int(self.ignore_index, "ignore_index must be an int")
        if self.long_documents not in _LONG_DOCUMENT_MODES:
            raise ValueError(
                f"long_documents must be one of {_LONG_DOCUMENT_MODES}, got {self.long_documents!r}"
            )
        # Dataclass fields the collator fills itself: a value passed by position lands here.
        if not isinstance(self.stats, PackingStats) or not isinstance(self.last_row_offsets, list):
            raise TypeError(
                f"stats and last_row_offsets are the collator's own (got {self.stats!r:.40}, "
                f"{self.last_row_offsets!r:.40}); pass max_length, window, long_documents, ignore_index"
            )

    def _example(self, example: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate one example and return its (input_ids, labels) as 1-D LongTensors."""
        if not isinstance(example, Mapping):
            raise ValueError(f"example {index} must be a mapping, got {type(example).__name__}")
        if example.get("input_ids") is None:
            raise ValueError(f"example {index} has no 'input_ids'")
        ids = _as_1d_long(example["input_ids"], "input_ids", index)
        if ids.numel() == 0:
            raise ValueError(f"example {index} is empty: 'input_ids' has 0 tokens")
        labels, keep = ids.clone(), None
        for key in ("labels", "completion_mask", "attention_mask"):
            if example.get(key) is None:
                continue
            value = _as_1d_long(example[key], key, index, bools=key != "labels")
            if value.numel() != ids.numel():
                raise ValueError(
                    f"example {index}: {key!r} has length {value.numel()} but 'input_ids' has {ids.numel()}"
                )
            if key == "labels":
                labels = value.clone()
            elif key == "completion_mask":
                labels[value == 0] = self.ignore_index
            else:
                keep = value != 0
        if keep is not None:  # a tokenizer's padding: packed rows need none, so its tokens are dropped
            ids, labels = ids[keep], labels[keep]
            if ids.numel() == 0:
                raise ValueError(f"example {index} is empty: its 'attention_mask' keeps 0 tokens")
        return ids, labels

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not isinstance(examples, Sequence) or isinstance(examples, (str, bytes)):
            raise TypeError(f"PackingCollator takes a list of examples, got {type(examples).__name__}")
        if len(examples) == 0:
            raise ValueError("cannot pack an empty list of examples")
        # Validate everything before touching the stats, so a rejected batch leaves no partial counts.
        parsed = [self._example(ex, i) for i, ex in enumerate(examples)]

        window = self.window or len(parsed)
        docs_ids: list[torch.Tensor] = []
        docs_labels: list[torch.Tensor] = []
        row_offsets = [0]
        truncated = split = 0
        for start in range(0, len(parsed), window):
            fragments: list[tuple[torch.Tensor, torch.Tensor]] = []
            for ids, labels in parsed[start : start + window]:
                n = ids.numel()
                if n <= self.max_length:
                    fragments.append((ids, labels))
                elif self.long_documents == "truncate":
                    fragments.append((ids[: self.max_length], labels[: self.max_length]))
                    truncated += n - self.max_length
                else:
                    split += 1
                    fragments.extend(zip(ids.split(self.max_length), labels.split(self.max_length)))
            for row in bfd_pack([f[0].numel() for f in fragments], self.max_length):
                for j in row:
                    docs_ids.append(fragments[j][0])
                    docs_labels.append(fragments[j][1])
                row_offsets.append(row_offsets[-1] + sum(fragments[j][0].numel() for j in row))

        input_ids = torch.cat(docs_ids)
        labels = torch.cat(docs_labels)
        doc_lens = torch.tensor([d.numel() for d in docs_ids], dtype=torch.long)
        starts = torch.cumsum(doc_lens, 0) - doc_lens
        labels[starts] = self.ignore_index
        position_ids = torch.arange(input_ids.numel()) - torch.repeat_interleave(starts, doc_lens)
        cu_seq_lens = torch.zeros(len(docs_ids) + 1, dtype=torch.int32)
        cu_seq_lens[1:] = torch.cumsum(doc_lens, 0)

        num_rows = len(row_offsets) - 1
        s = self.stats
        s.examples += len(parsed)
        s.documents += len(docs_ids)
        s.rows += num_rows
        s.tokens += input_ids.numel()
        s.capacity += num_rows * self.max_length
        s.truncated_tokens += truncated
        s.split_documents += split
        s.supervised_tokens += int((labels != self.ignore_index).sum())
        self.last_row_offsets = row_offsets

        return {
            "input_ids": input_ids.unsqueeze(0),
            "labels": labels.unsqueeze(0),
            "position_ids": position_ids.unsqueeze(0),
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens.clone(),
            # The bound, not this batch's longest document: attention kernels take any upper bound, and a
            # value that changes per batch would cost torch.compile a recompile on top of cu_seq_lens'.
            "max_length_q": self.max_length,
            "max_length_k": self.max_length,
        }
