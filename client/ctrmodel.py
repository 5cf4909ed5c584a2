"""The hidden click model behind the synthetic click log: how ids are drawn and labels decided.

Everything is a function of (seed, block index) or of (seed, feature, id), computed by hashing,
so no table of per-id weights is ever held and any number of rows can be drawn in fixed memory.
`docs/data.md` ("The generator and its hidden model") states the model; this module is it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from shardps.proto.records import CATEGORICAL_FEATURES, CTR_RECORD, DENSE_FEATURES

BLOCK_ROWS = 16384  # rows drawn per random generator; part of the determinism contract

# Vocabulary sizes grow geometrically from C1 (4 ids) to C26 (4 * 2**20 ids) ...
VOCAB_SIZES = tuple(round(4 * 2 ** (20 * f / (CATEGORICAL_FEATURES - 1))) for f in range(CATEGORICAL_FEATURES))
# ... and the Zipf exponent cycles 1.1, 1.2, 1.3 (a larger exponent: a heavier head).
ZIPF_EXPONENTS = tuple(1.1 + 0.1 * (f % 3) for f in range(CATEGORICAL_FEATURES))
MAIN_EFFECT_FEATURES = tuple(range(0, CATEGORICAL_FEATURES, 2))  # C1, C3, ..., C25
MAIN_EFFECT_SCALE = 0.3
CROSSES = ((0, 1), (2, 9), (3, 12), (5, 16), (7, 20), (10, 25))  # 0-based feature pairs
CROSS_DIM = 4
CROSS_SCALE = 0.5
DENSE_MU = tuple(0.5 + 0.25 * j for j in range(DENSE_FEATURES))
DENSE_WEIGHTS = tuple(0.2 * (-1) ** j for j in range(DENSE_FEATURES))
BIAS = -1.5
_SQRT3 = float(np.sqrt(3.0))


def salt(seed: int, *parts: object) -> np.uint64:
    """A 64-bit constant from the seed and a purpose: the first 8 bytes of a SHA-256, little-endian."""
    text = ":".join(str(p) for p in (seed, *parts))
    return np.uint64(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little"))


def mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays: a bijection that spreads nearby values apart."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def unit_weight(ranks: np.ndarray, key: np.uint64) -> np.ndarray:
    """A hashed weight per rank, uniform on [-sqrt(3), sqrt(3)] (mean 0, variance 1)."""
    u = (mix(ranks + key) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    return (2.0 * u - 1.0) * _SQRT3


def zipf_ranks(u: np.ndarray, vocab: int, exponent: float) -> np.ndarray:
    """0-based ranks in [0, vocab) with P(rank k) roughly proportional to (k + 1) ** -exponent.

    The inverse CDF of the continuous power law on [1, vocab + 1), floored: O(1) memory for
    any vocabulary, unlike a table of the discrete CDF.
    """
    a = 1.0 - exponent
    x = (1.0 + u * ((vocab + 1.0) ** a - 1.0)) ** (1.0 / a)
    return np.minimum(x.astype(np.int64) - 1, vocab - 1).astype(np.uint64)


@dataclass(frozen=True)
class Block:
    """Rows of one generation block: the records and each row's true click probability."""

    records: np.ndarray
    probability: np.ndarray


def draw_block(seed: int, index: int, rows: int) -> Block:
    """Block `index` of the log (`rows` <= BLOCK_ROWS rows, fewer only for the last block).

    The draws come from `np.random.default_rng([seed, index])` in a fixed order: categorical
    uniforms (rows x 26), dense normals (rows x 13), label uniforms (rows).
    """
    rng = np.random.default_rng([seed, index])
    u_cat = rng.random((rows, CATEGORICAL_FEATURES))
    z_dense = rng.standard_normal((rows, DENSE_FEATURES))
    u_label = rng.random(rows)
    ranks = [zipf_ranks(u_cat[:, f], VOCAB_SIZES[f], ZIPF_EXPONENTS[f]) for f in range(CATEGORICAL_FEATURES)]
    dense = np.floor(np.expm1(np.maximum(0.0, np.asarray(DENSE_MU) + z_dense)))
    dense = np.minimum(dense, np.iinfo(np.int32).max).astype(np.int32)
    logit = np.full(rows, BIAS) + hidden_logit(seed, ranks, dense)
    probability = 1.0 / (1.0 + np.exp(-logit))
    records = np.empty(rows, dtype=CTR_RECORD)
    records["label"] = u_label < probability
    records["dense"] = dense
    for f in range(CATEGORICAL_FEATURES):
        records["cat"][:, f] = mix(ranks[f] + salt(seed, "id", f)).view(np.int64)
    return Block(records, probability)


def hidden_logit(seed: int, ranks: list[np.ndarray], dense: np.ndarray) -> np.ndarray:
    """The click logit without the bias: main effects + factorised crosses + dense terms.

    The dense term reads the stored integer counts (through log1p), so the true probability
    is a function of the stored row alone and its AUC is the best any model can reach.
    """
    logit = np.zeros(len(dense))
    for f in MAIN_EFFECT_FEATURES:
        logit += MAIN_EFFECT_SCALE * unit_weight(ranks[f], salt(seed, "main", f))
    for f, g in CROSSES:
        dot = np.zeros(len(dense))
        for d in range(CROSS_DIM):
            left = unit_weight(ranks[f], salt(seed, "cross", f, g, d))
            dot += left * unit_weight(ranks[g], salt(seed, "cross", g, f, d))
        logit += CROSS_SCALE * dot / np.sqrt(CROSS_DIM)
    standardised = np.log1p(dense.astype(np.float64)) - np.asarray(DENSE_MU)
    return logit + standardised @ np.asarray(DENSE_WEIGHTS)


def description() -> dict[str, object]:
    """The model's constants for the manifest (the per-id weights follow from the seed)."""
    return {
        "vocab_sizes": list(VOCAB_SIZES), "zipf_exponents": [round(s, 3) for s in ZIPF_EXPONENTS],
        "main_effect_features": list(MAIN_EFFECT_FEATURES), "main_effect_scale": MAIN_EFFECT_SCALE,
        "crosses": [list(c) for c in CROSSES], "cross_dim": CROSS_DIM, "cross_scale": CROSS_SCALE,
        "dense_mu": list(DENSE_MU), "dense_weights": list(DENSE_WEIGHTS), "bias": BIAS,
        "block_rows": BLOCK_ROWS,
    }
