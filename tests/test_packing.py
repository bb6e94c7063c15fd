import itertools
import random

import pytest
import torch

from chronipatch.packing import PackingCollator, PackingStats, bfd_pack


def _lognormal_lengths(n, median, max_length, seed=0):
    rng = random.Random(seed)
    return [min(max_length, max(1, round(rng.lognormvariate(0.0, 0.8) * median))) for _ in range(n)]


def _examples(lengths, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (n,), generator=g)} for n in lengths]


def _check_layout(batch, max_length):
    """Structural invariants of a packed batch; returns the document lengths."""
    ids, pos, cu = batch["input_ids"], batch["position_ids"], batch["cu_seq_lens_q"]
    assert ids.shape == batch["labels"].shape == pos.shape and ids.shape[0] == 1
    assert ids.dtype == batch["labels"].dtype == pos.dtype == torch.long
    assert cu.dtype == torch.int32 and batch["cu_seq_lens_k"].dtype == torch.int32
    assert torch.equal(cu, batch["cu_seq_lens_k"])
    assert cu[0] == 0 and cu[-1] == ids.shape[1]
    doc_lens = (cu[1:] - cu[:-1]).tolist()
    assert all(n >= 1 for n in doc_lens)
    expected_pos = torch.cat([torch.arange(n) for n in doc_lens])
    assert torch.equal(pos[0], expected_pos)
    assert type(batch["max_length_q"]) is int and type(batch["max_length_k"]) is int
    assert batch["max_length_q"] == batch["max_length_k"] == max_length  # the collator's bound
    assert "attention_mask" not in batch
    assert max(doc_lens) <= max_length
    return doc_lens


# ---------------------------------------------------------------- bfd_pack


def test_bfd_pack_small_exact():
    # Visit order 6 5 4 3 2 1 into capacity 7: 6, 5 and 4 each open a row (rem 1, 2, 3); 3 closes the
    # rem-3 row, 2 the rem-2 row, 1 the rem-1 row.
    assert bfd_pack([6, 5, 4, 3, 2, 1], 7) == [[0, 5], [1, 4], [2, 3]]
    assert bfd_pack([4, 6, 3], 10) == [[1, 0], [2]]
    assert bfd_pack([7, 5, 3], 10) == [[0, 2], [1]]
    assert bfd_pack([3, 3, 3], 10) == [[0, 1, 2]]
    assert bfd_pack([], 10) == []


def test_bfd_pack_best_fit_not_first_fit():
    # 12 -> row0 (rem 8); 9 -> row1 (rem 11); 9 -> row1 (rem 2). Now row0 has rem 8 and row1 rem 2:
    # best fit puts the 2 into row1, first fit would have put it into row0.
    assert bfd_pack([12, 9, 9, 2], 20) == [[0], [1, 2, 3]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bfd_pack_partition_and_capacity(seed):
    max_length = 2048
    lengths = _lognormal_lengths(10_000, 400, max_length, seed=seed)
    rows = bfd_pack(lengths, max_length)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= max_length for row in rows)
    # Lower bound on rows is ceil(total / max_length); BFD should be within a few percent of it.
    lower = -(-sum(lengths) // max_length)
    assert len(rows) <= lower * 1.03 + 1


def test_bfd_pack_rejects_bad_lengths():
    with pytest.raises(ValueError, match="item 1"):
        bfd_pack([3, 11], 10)
    with pytest.raises(ValueError, match="item 0"):
        bfd_pack([0], 10)
    with pytest.raises(ValueError, match="max_length"):
        bfd_pack([1], 0)


# ---------------------------------------------------------------- collator: layout and labels


def test_fill_ratio_on_skewed_lengths():
    max_length = 2048
    lengths = _lognormal_lengths(2000, 400, max_length, seed=0)
    collator = PackingCollator(max_length=max_length)
    batch = collator(_examples(lengths))
    doc_lens = _check_layout(batch, max_length)
    assert sorted(doc_lens) == sorted(lengths)
    s = collator.stats
    assert s.fill_ratio >= 0.95
    assert s.tokens == sum(lengths) == batch["input_ids"].shape[1]
    assert s.capacity == s.rows * max_length
    # Row boundaries: every row fits, and they tile the sequence.
    offs = collator.last_row_offsets
    assert offs[0] == 0 and offs[-1] == s.tokens and len(offs) == s.rows + 1
    assert all(0 < b - a <= max_length for a, b in itertools.pairwise(offs))
    # Row boundaries fall on document boundaries.
    assert set(offs) <= set(batch["cu_seq_lens_q"].tolist())


def test_tokens_and_labels_preserved():
    lengths = [5, 9, 3, 7, 1, 4]
    examples = []
    for i, n in enumerate(lengths):
        ids = list(range(100 * i, 100 * i + n))  # unique ids identify the source example
        if i % 3 == 0:
            examples.append({"input_ids": ids})
        elif i % 3 == 1:
            examples.append({"input_ids": ids, "labels": [t if t % 2 else -100 for t in ids]})
        else:
            examples.append({"input_ids": torch.tensor(ids), "completion_mask": [k % 2 for k in range(n)]})
    collator = PackingCollator(max_length=10)
    batch = collator(examples)
    doc_lens = _check_layout(batch, 10)
    cu = batch["cu_seq_lens_q"].tolist()
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    seen = set()
    for a, b in itertools.pairwise(cu):
        src = int(ids[a]) // 100
        seen.add(src)
        n = lengths[src]
        assert b - a == n
        assert ids[a:b].tolist() == list(range(100 * src, 100 * src + n))
        exp = examples[src]
        if "labels" in exp:
            want = list(exp["labels"])
        elif "completion_mask" in exp:
            want = [t if m else -100 for t, m in zip(exp["input_ids"].tolist(), exp["completion_mask"])]
        else:
            want = list(exp["input_ids"])
        want[0] = -100  # document start is never a target
        assert labels[a:b].tolist() == want
    assert seen == set(range(len(lengths)))
    assert sorted(doc_lens) == sorted(lengths)
    assert collator.stats.supervised_tokens == int((labels != -100).sum())


def test_labels_and_completion_mask_combined_and_custom_ignore_index():
    ex = {"input_ids": [1, 2, 3, 4], "labels": [-7, 12, 13, 14], "completion_mask": [1, 1, 0, 1]}
    batch = PackingCollator(max_length=8, ignore_index=-7)([ex])
    assert batch["labels"].tolist() == [[-7, 12, -7, 14]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3]]
    as_bools = {**ex, "completion_mask": [True, True, False, True]}  # a mask may be bool
    assert PackingCollator(max_length=8, ignore_index=-7)([as_bools])["labels"].tolist() == [[-7, 12, -7, 14]]


def test_attention_mask_padding_is_dropped():
    """Examples a tokenizer padded (left or right): the tokens their attention_mask marks 0 are not packed."""
    right = {"input_ids": [1, 2, 3, 0, 0], "labels": [1, 2, 3, 0, 0], "attention_mask": [1, 1, 1, 0, 0]}
    left = {"input_ids": [0, 4, 5], "completion_mask": [1, 0, 1], "attention_mask": [False, True, True]}
    collator = PackingCollator(max_length=8)
    batch = collator([right, left])
    assert sorted(batch["cu_seq_lens_q"].diff().tolist()) == [2, 3]
    assert collator.stats.tokens == 5
    docs = {tuple(batch["input_ids"][0, a:b].tolist()): batch["labels"][0, a:b].tolist() for a, b in
            zip(batch["cu_seq_lens_q"][:-1].tolist(), batch["cu_seq_lens_q"][1:].tolist())}  # fmt: skip
    assert docs == {(1, 2, 3): [-100, 2, 3], (4, 5): [-100, 5]}
    with pytest.raises(ValueError, match=r"example 0 is empty: its 'attention_mask' keeps 0 tokens"):
        collator([{"input_ids": [0, 0], "attention_mask": [0, 0]}])
    with pytest.raises(ValueError, match=r"example 0: 'attention_mask' has length 1"):
        collator([{"input_ids": [1, 2], "attention_mask": [1]}])


def test_doc_starts_masked_even_when_supervised():
    exs = [{"input_ids": [5] * n, "labels": [5] * n} for n in (3, 2, 4)]
    batch = PackingCollator(max_length=4)(exs)
    cu = batch["cu_seq_lens_q"].tolist()
    labels = batch["labels"][0].tolist()
    assert [labels[a] for a in cu[:-1]] == [-100] * 3
    assert labels.count(5) == 9 - 3


def test_window_packs_groups_separately():
    lengths = [6, 6, 4, 4]
    # Whole list: 6+4, 6+4 -> 2 rows. Window 2: {6,6} -> 2 rows, {4,4} -> 1 row.
    whole = PackingCollator(max_length=10)
    whole(_examples(lengths))
    assert whole.stats.rows == 2
    windowed = PackingCollator(max_length=10, window=2)
    batch = windowed(_examples(lengths))
    assert windowed.stats.rows == 3
    assert _check_layout(batch, 10) == [6, 6, 4, 4]
    assert windowed.last_row_offsets == [0, 6, 12, 20]


# ---------------------------------------------------------------- long documents


def test_long_document_split():
    collator = PackingCollator(max_length=4)
    ex = {"input_ids": list(range(10)), "labels": list(range(10, 20))}
    batch = collator([ex, {"input_ids": [99]}])
    doc_lens = _check_layout(batch, 4)
    assert sorted(doc_lens) == [1, 2, 4, 4]
    assert collator.stats.split_documents == 1
    assert collator.stats.truncated_tokens == 0
    assert collator.stats.documents == 4
    assert collator.stats.tokens == 11
    # Fragments are contiguous slices of the original, each starting a new document.
    cu = batch["cu_seq_lens_q"].tolist()
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    frags = {ids[a]: (ids[a:b], labels[a:b]) for a, b in itertools.pairwise(cu)}
    for start, n in ((0, 4), (4, 4), (8, 2)):
        got_ids, got_labels = frags[start]
        assert got_ids == list(range(start, start + n))
        assert got_labels == [-100, *range(11 + start, 10 + start + n)]


def test_long_document_truncate():
    collator = PackingCollator(max_length=4, long_documents="truncate")
    batch = collator([{"input_ids": list(range(10))}, {"input_ids": [1, 2, 3, 4, 5]}, {"input_ids": [7]}])
    assert _check_layout(batch, 4) == [4, 4, 1]
    assert batch["input_ids"][0, :4].tolist() == [0, 1, 2, 3]
    assert collator.stats.truncated_tokens == 6 + 1
    assert collator.stats.split_documents == 0
    assert collator.stats.tokens == 9


# ---------------------------------------------------------------- stats


def test_stats_accumulate_and_reset():
    collator = PackingCollator(max_length=8)
    collator(_examples([8, 3, 5, 2]))  # rows: 8 | 5+3 | 2
    collator(_examples([4, 4], seed=1))
    s = collator.stats
    assert s.examples == 6 and s.documents == 6
    assert s.tokens == 26
    assert s.rows == 3 + 1
    assert s.capacity == 4 * 8
    assert s.fill_ratio == pytest.approx(26 / 32)
    assert s.documents_per_row == pytest.approx(6 / 4)
    assert s.supervised_tokens == 26 - 6
    d = s.as_dict()
    assert d["packing/fill_ratio"] == pytest.approx(26 / 32)
    assert d["packing/rows"] == 4 and d["packing/truncated_tokens"] == 0
    assert all(isinstance(v, (int, float)) for v in d.values())
    s.reset()
    assert s == PackingStats() and s.fill_ratio == 0.0 and s.documents_per_row == 0.0


def test_numpy_max_length_is_taken_as_an_int():
    import numpy as np

    collator = PackingCollator(max_length=np.int64(8))
    batch = collator([{"input_ids": [1, 2, 3]}])
    assert type(collator.max_length) is int and type(batch["max_length_q"]) is int


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_length": 1}, "max_length"),
        ({"max_length": 8, "long_documents": "drop"}, "long_documents"),
        ({"max_length": 8, "window": 0}, "window"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PackingCollator(**kwargs)


def test_own_fields_given_by_position_are_refused():
    """A fifth positional value lands in the collator's own statistics: refused at construction, not at the
    first batch."""
    with pytest.raises(TypeError, match="stats and last_row_offsets are the collator's own"):
        PackingCollator(8, None, "split", -100, "oops")


@pytest.mark.parametrize(
    ("examples", "match"),
    [
        ([], "empty list"),
        ([{"input_ids": [1, 2]}, {"labels": [1, 2]}], r"example 1 has no 'input_ids'"),
        ([{"input_ids": [1, 2]}, {"input_ids": []}], r"example 1 is empty"),
        ([{"input_ids": [1, 2], "labels": [1]}], r"example 0: 'labels' has length 1 but 'input_ids' has 2"),
        ([{"input_ids": [1, 2], "completion_mask": [1, 1, 0]}], r"example 0: 'completion_mask' has length 3"),
        ([{"input_ids": [[1, 2]]}], r"example 0: 'input_ids' must be 1-D"),
        ([{"input_ids": [True, False]}], r"example 0: 'input_ids' must hold integers, got torch.bool"),
        ([{"input_ids": [1, 2], "labels": [0.5, 1.0]}], r"example 0: 'labels' must hold integers"),
        ([[1, 2, 3]], r"example 0 must be a mapping"),
    ],
)
def test_bad_examples(examples, match):
    collator = PackingCollator(max_length=8)
    with pytest.raises(ValueError, match=match):
        collator(examples)
    assert collator.stats == PackingStats()  # rejected batches leave no partial counts


# ---------------------------------------------------------------- model equivalence


def _eager_fp64_softmax(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention, except that the softmax stays in the input dtype."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


# Stock "eager" computes its softmax in float32 even for float64 models (`softmax(..., dtype=torch.float32)`),
# so a longer, masked key row rounds differently from the same document alone: differences ~4e-8. The same
# eager math with a float64 softmax (and sdpa) agree to the last bit, which is the strict check.
@pytest.mark.parametrize(("attn", "tol"), [("eager_fp64_softmax", 1e-12), ("sdpa", 1e-12), ("eager", 1e-6)])
def test_packed_logits_match_separate_documents(attn, tol, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    # Registered for this test only; monkeypatch restores the global registries afterwards.
    monkeypatch.setitem(
        transformers.AttentionInterface._global_mapping, "eager_fp64_softmax", _eager_fp64_softmax
    )
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, "eager_fp64_softmax", eager_mask)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        use_cache=False,
        attn_implementation=attn,
    )
    model = transformers.LlamaForCausalLM(config).to(torch.float64).eval()
    assert model.config._attn_implementation == attn
    collator = PackingCollator(max_length=16)
    batch = collator(_examples([7, 13, 4], seed=3))
    assert collator.stats.rows == 2  # 13 | 7+4: the documents span a row boundary too
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        # The whole batch (cu_seq_lens_*, max_length_* included) is valid model input; non-flash kernels
        # ignore the varlen keys.
        packed = model(**batch, use_cache=False)
        logits, labels = packed.logits[0], batch["labels"][0]
        cu = batch["cu_seq_lens_q"].tolist()
        doc_loss_sum, doc_count = 0.0, 0
        for a, b in itertools.pairwise(cu):
            ids = batch["input_ids"][:, a:b]
            alone = model(input_ids=ids, use_cache=False).logits[0]
            torch.testing.assert_close(logits[a:b], alone, atol=tol, rtol=0)
            doc_loss_sum += ce(alone[:-1], ids[0, 1:], reduction="sum").item()
            doc_count += b - a - 1
        # Without position_ids the model sees one long sequence, so packing detection is what matters here.
        naive = model(input_ids=batch["input_ids"], use_cache=False).logits
    assert (naive - packed.logits).abs().max() > 1e-3
    # Next-token loss over the packed labels (HF's shift) equals the per-document losses: boundary masking
    # removes exactly the cross-document predictions.
    assert doc_count == collator.stats.supervised_tokens == int((labels[1:] != -100).sum())
    packed_loss = ce(logits[:-1], labels[1:], ignore_index=-100, reduction="sum").item()
    assert packed_loss == pytest.approx(doc_loss_sum, rel=tol, abs=0)
    # HF's loss casts logits to float32 (loss_utils: `logits = logits.float()`): float32 tolerance.
    assert packed.loss.item() == pytest.approx(doc_loss_sum / doc_count, rel=1e-6)
