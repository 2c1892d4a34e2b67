"""Stored teacher targets: ids bit-packed losslessly for any vocabulary size, values within their error."""
from __future__ import annotations

import numpy as np
import pytest

from posttrain.kd.packing import ValueCodec, bytes_per_token, id_bits, pack_bits, unpack_bits


@pytest.mark.parametrize("vocab", [2, 1000, 32000, 128256, 2 ** 17, 2 ** 17 + 1, 151_936, 262_144, 2 ** 20, 2 ** 31 - 1])
@pytest.mark.parametrize("k", [1, 7, 64])
def test_id_pack_unpack_round_trip(vocab, k):
    rng = np.random.default_rng(vocab + k)
    ids = rng.integers(0, vocab, size=(5, 3, k), dtype=np.int64)
    ids[0, 0, 0] = vocab - 1  # the largest id must survive too
    bits = id_bits(vocab)
    packed = pack_bits(ids, bits)
    assert packed.dtype == np.uint8 and packed.shape == (5, 3, -(-k * bits // 8))
    np.testing.assert_array_equal(unpack_bits(packed, bits, k), ids)


def test_llama3_vocab_needs_17_bits():
    assert id_bits(128256) == 17 and id_bits(2 ** 17) == 17 and id_bits(2 ** 17 + 1) == 18


@pytest.mark.parametrize("encoding,max_mean_error", [("fp16", 0.002), ("q12", 0.003), ("q10", 0.009), ("q8", 0.017)])
def test_value_codecs_stay_within_their_error(encoding, max_mean_error):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(200, 1000))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top = -np.sort(-logp, axis=-1)[:, :64]
    top = top[top.min(axis=-1) > -15]  # inside every codec's range
    codec = ValueCodec(encoding)
    decoded = codec.decode(codec.encode(top), 64)
    assert np.abs(decoded - top).mean() <= max_mean_error
    assert np.all(decoded <= 0)


def test_values_below_the_quantised_range_decode_as_zero_probability_instead_of_wrapping_or_clipping():
    codec = ValueCodec("q8")
    decoded = codec.decode(codec.encode(np.array([[-0.5, -15.8, -100.0]])), 3)
    assert decoded[0, 0] == pytest.approx(-0.5, abs=0.04) and decoded[0, 1] == pytest.approx(-15.8, abs=1 / 32)
    assert decoded[0, 2] == -np.inf  # not -15.94: that would overstate its probability; its mass is in the tail


def test_bytes_per_token_arithmetic():
    assert bytes_per_token(128256, 64, "fp16") == 136 + 128
    assert bytes_per_token(128256, 64, "q8") == 136 + 64
