"""The compact encoding of teacher targets: rANS coding, bit fields, shards, capture and distill."""
from __future__ import annotations

import numpy as np
import pytest

from posttrain.core.errors import UserError
from posttrain.kd import compact, rans
from posttrain.kd.packing import pack_fields, unpack_fields

V = 128256


def teacher(positions: int, k: int, seed: int = 0, vocab: int = V) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids and full-vocabulary log-probs of a small Zipf-shaped synthetic teacher."""
    rng = np.random.default_rng(seed)
    prior = -1.1 * np.log(np.arange(1, vocab + 1))
    ids, values = np.empty((positions, k), np.int64), np.empty((positions, k), np.float32)
    for p in range(positions):
        logits = prior + rng.normal(0, 2.0, vocab)
        if p % 3 == 0:
            logits[int(rng.integers(0, 50))] += 12.0  # a confident position
        logp = logits - np.logaddexp.reduce(logits)
        top = np.argpartition(-logp, k)[:k]
        ids[p], values[p] = top, logp[top]
    return ids, values


def test_rans_round_trips_many_streams_in_pieces_and_spots_damage():
    rng = np.random.default_rng(0)
    steps, lanes = 120, 300
    lane_stream = np.sort(np.concatenate([np.arange(5), rng.integers(0, 5, lanes - 5)]))
    contexts = rng.integers(1, 4, (steps, lanes))
    contexts[100:, ::2] = rans.NULL_CONTEXT  # lanes with fewer symbols
    probabilities = rng.dirichlet(np.full(40, 0.3), 4)
    symbols = np.zeros((steps, lanes), np.int64)
    for context in (1, 2, 3):
        where = contexts == context
        symbols[where] = rng.choice(40, where.sum(), p=probabilities[context])
    counts = np.zeros((4, 40))
    np.add.at(counts, (contexts, symbols), 1)
    tables = rans.Tables(rans.normalise(counts))
    assert np.all(tables.freq.sum(1) == rans.TOTAL) and np.all(tables.freq[counts > 0] >= 1)
    streams = rans.encode(symbols, contexts, tables, lane_stream, 5)
    words = np.concatenate(streams)
    bounds = np.concatenate([[0], np.cumsum([len(s) for s in streams])])
    decoder = rans.Decoder(words, bounds, tables, lane_stream)
    got = np.concatenate([decoder.decode(contexts[:50]), decoder.decode(contexts[50:])])
    decoder.finish()
    np.testing.assert_array_equal(got, symbols)
    # Entropy coded: within 2% + the lanes' states of the symbols' empirical entropy.
    entropy = 0.0
    for context in (1, 2, 3):
        _, n = np.unique(symbols[contexts == context], return_counts=True)
        entropy -= (n * np.log2(n / n.sum())).sum() / 8
    assert 2 * len(words) <= 1.02 * entropy + 4 * lanes
    # One stream alone decodes to its lanes' symbols; a flipped word is noticed.
    mine = lane_stream == 2
    alone = rans.Decoder(streams[2], np.array([0, len(streams[2])]), tables, np.zeros(mine.sum(), np.int64))
    np.testing.assert_array_equal(alone.decode(contexts[:, mine]), symbols[:, mine])
    alone.finish()
    damaged = streams[2].copy()
    damaged[len(damaged) // 2] ^= 0x0F0F
    broken = rans.Decoder(damaged, np.array([0, len(damaged)]), tables, np.zeros(mine.sum(), np.int64))
    with pytest.raises(rans.CorruptStream):
        broken.decode(contexts[:, mine])
        broken.finish()


def test_bit_fields_round_trip_at_any_offset():
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 33, 5000)
    values = rng.integers(0, 2 ** 32, 5000) & ((1 << lengths) - 1)
    data = pack_fields(values, lengths)
    assert len(data) == -(-lengths.sum() // 8)
    np.testing.assert_array_equal(unpack_fields(data, lengths), values)
    start = int(lengths[:100].sum())
    np.testing.assert_array_equal(unpack_fields(data[start // 8:], lengths[100:], first_bit=start % 8), values[100:])
    with pytest.raises(ValueError):
        unpack_fields(data[:-1], lengths)


def _decode_all(blocks_data, bounds, tables, lengths, k):
    blocks = [blocks_data[bounds[i]:bounds[i + 1]] for i in range(len(lengths))]
    return compact.decode(blocks, np.asarray(lengths), compact.decode_tables(tables), k)


@pytest.mark.slow
def test_compact_keeps_every_id_and_quantises_values_to_a_hundredth_of_a_nat():
    ids, values = teacher(300, 64)
    lengths = [1, 120, 7, 172]
    encoded = compact.encode(lengths, ids, values, None)
    data, bounds, tables, counts, stored = encoded.data, encoded.bounds, encoded.tables, encoded.counts, encoded.stored
    got_ids, got_values = _decode_all(data, bounds, tables, lengths, 64)
    assert np.all(counts == 64)
    np.testing.assert_array_equal(np.sort(got_ids, 1), np.sort(ids, 1))
    # Values follow their ids; each within half a step of the teacher's, about a quarter step on average.
    order = np.argsort(ids, 1)
    expected = np.take_along_axis(values, order, 1)
    error = np.abs(got_values - expected)
    assert error.max() <= compact.STEP / 2 + 1e-5 and error.mean() < 0.0105
    np.testing.assert_array_equal(np.sort(got_values, 1), np.sort(np.take_along_axis(stored, order, 1), 1))
    # ~1.45 bytes per entry for 64 of 128256 ids (fixed-width 17-bit ids and fp16 values: 4.1).
    assert len(data) / 300 / 64 < 1.6
    # A sequence decoded alone equals its part of the batch.
    alone_ids, alone_values = compact.decode([data[bounds[1]:bounds[2]]], np.array([120]),
                                             compact.decode_tables(tables), 64)
    np.testing.assert_array_equal(alone_ids, got_ids[1:121])
    np.testing.assert_array_equal(alone_values, got_values[1:121])


@pytest.mark.slow
def test_mass_keeps_the_fewest_best_entries_that_reach_it():
    ids, values = teacher(90, 64, seed=3)
    encoded = compact.encode([90], ids, values, 0.9)
    data, bounds, tables, counts = encoded.data, encoded.bounds, encoded.tables, encoded.counts
    probabilities = np.sort(np.exp(values.astype(np.float64)), 1)[:, ::-1]
    covered = np.cumsum(probabilities, 1)
    for p in range(90):
        n = counts[p]
        assert n == 64 or (covered[p, n - 1] >= 0.9 and (n == 1 or covered[p, n - 2] < 0.9))
    assert counts.min() < 64 < counts.max() + 1  # confident positions keep few entries
    got_ids, got_values = _decode_all(data, bounds, tables, [90], 64)
    for p in range(90):
        kept = np.isfinite(got_values[p])
        assert kept.sum() == counts[p]
        best = ids[p][np.argsort(-values[p], kind="stable")[:counts[p]]]
        assert set(got_ids[p][kept]) == set(best)
        assert np.all(got_ids[p][~kept] == got_ids[p][0])  # padding repeats an id, ignored by the losses


def test_escapes_minus_infinity_and_large_vocabularies_round_trip():
    rng = np.random.default_rng(5)
    vocab, k, n = 1 << 20, 8, 50
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)])
    values = -np.sort(rng.uniform(0, 40, (n, k)), 1).astype(np.float32)  # spreads far beyond 255 steps
    values[3, -1] = -np.inf
    ids[4, 0] = vocab - 1
    encoded = compact.encode([n], ids, values, None)
    data, bounds, tables = encoded.data, encoded.bounds, encoded.tables
    got_ids, got_values = _decode_all(data, bounds, tables, [n], k)
    order = np.argsort(ids, 1)
    np.testing.assert_array_equal(got_ids, np.take_along_axis(ids, order, 1))
    expected = np.take_along_axis(values, order, 1)
    assert np.all(np.isneginf(got_values) == np.isneginf(expected))
    finite = np.isfinite(expected)
    assert np.abs(got_values[finite] - expected[finite]).max() <= compact.STEP / 2 + 1e-5


def test_compact_shard_reads_lazily_and_damage_is_one_clear_error(tmp_path):
    from posttrain.kd.shards import LazyShard, read_shard, shard_meta, write_shard

    ids, values = teacher(60, 16, vocab=1024)
    tails = np.log1p(-np.exp(np.logaddexp.reduce(values.astype(np.float64), axis=1)))
    meta = shard_meta(teacher="t", teacher_key="", tokenizer_hash="", vocab_size=1024, k=16, encoding="compact",
                      mode="topk", samples=None, temperature=1.0, chat_template_sha256="", data_fingerprint="",
                      values="logprobs", special_tokens={}, compact=compact.parameters(), mass=0.5)
    sequences = [list(range(1, 21)), list(range(500, 540))]
    masks = [[0] * 5 + [1] * 15, [1] * 40]
    path = tmp_path / "shard.safetensors"
    stored, stored_tail = write_shard(path, sequences, masks, ids, values, meta, tails)
    shard = read_shard(path)
    row = shard.sequence(1)
    np.testing.assert_array_equal(row["input_ids"], sequences[1])
    np.testing.assert_array_equal(row["loss_mask"], np.array(masks[1], bool))
    # What mass left out joined the tail (kept exactly, as fp16), so body and tail stay one distribution.
    probabilities = np.exp(values[20:].astype(np.float64))
    kept = np.array([[i in set(row["target_ids"][p][np.isfinite(row["target_values"][p])]) for i in ids[20 + p]]
                     for p in range(40)])
    assert not kept.all()
    expected_tail = np.log(np.exp(tails[20:]) + (probabilities * ~kept).sum(1))
    np.testing.assert_allclose(row["target_tail"], expected_tail, rtol=2e-3)
    np.testing.assert_array_equal(row["target_tail"], stored_tail[20:])
    assert np.all(np.isfinite(stored).sum(1) <= 16)
    # Any flipped bit in the coded targets (rANS words or raw mantissa bits): one UserError naming the
    # file and the sequence, when read and when a resumed capture checks the shard.
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()
    clean = load_file(str(path))
    rng = np.random.default_rng(0)
    start, end = int(clean["target_bounds"][1]), int(clean["target_bounds"][2])
    for offset in [end - 1, *rng.integers(start, end, 6)]:  # the last byte holds raw mantissa bits
        tensors = {name: value.copy() for name, value in clean.items()}
        tensors["targets"][offset] ^= 1 << int(rng.integers(0, 8))
        save_file(tensors, str(path), metadata=metadata)
        with pytest.raises(UserError, match=r"shard\.safetensors, sequence 2: .*damaged"):
            LazyShard(path).sequence(1)
        with pytest.raises(UserError, match=r"sequence 2"):
            read_shard(path)
        assert LazyShard(path).sequence(0)["input_ids"].tolist() == sequences[0]  # the others still read
