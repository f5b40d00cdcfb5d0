"""Small transforms for tests: deterministic given rng, some changing dtypes and shapes."""

from __future__ import annotations

import numpy as np


def scale_and_noise(batch: dict, rng: np.random.Generator) -> dict:
    """x -> x * 2 + noise (float64), id kept, one new field."""
    noise = rng.standard_normal(batch["x"].shape)
    return {"id": batch["id"], "x": batch["x"] * 2.0 + noise,
            "noise": noise.astype(np.float32)}


def crop_flip(batch: dict, rng: np.random.Generator) -> dict:
    """A random 3x3 crop and horizontal flip of (4, 5, 3) uint8 images: shape changes."""
    img = batch["img"]
    top, left = rng.integers(0, 2), rng.integers(0, 3)
    out = img[:, top : top + 3, left : left + 3, :]
    if rng.random() < 0.5:
        out = out[:, :, ::-1, :]
    return {"id": batch["id"], "img": np.ascontiguousarray(out)}


crop_flip.output_schema = {"id": ("int64", ()), "img": ("uint8", (3, 3, 3))}


def pad_tokens(batch: dict, rng: np.random.Generator) -> dict:
    """Variable-length 'token' rows padded to the longest in the batch: shapes vary per batch."""
    lengths = (batch["id"] % 7 + 1).astype(np.int64)
    width = int(lengths.max())
    tokens = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, :n] = batch["id"][i] % 100 + np.arange(n)
    return {"id": batch["id"], "tokens": tokens, "length": lengths}


def explode(batch: dict, rng: np.random.Generator) -> dict:
    if (batch["id"] == 96).any():
        raise ValueError("row 96 is cursed")
    return batch


def not_a_dict(batch: dict, rng: np.random.Generator) -> list:
    return [batch["id"]]


def burn_cpu(batch: dict, rng: np.random.Generator) -> dict:
    """CPU-heavy on purpose (a stand-in for decoding or augmentation)."""
    x = batch["x"].astype(np.float64)
    for _ in range(20):
        x = np.tanh(x @ np.eye(x.shape[1]) * 0.9 + 0.01)
    return {"id": batch["id"], "x": x.astype(np.float32)}


def expand(batch: dict, rng: np.random.Generator) -> dict:
    """uint8 images to float64: 8x the bytes, more than the server's size guess."""
    return {"id": batch["id"], "img": batch["img"].astype(np.float64)}


def sleepy(batch: dict, rng: np.random.Generator) -> dict:
    """A slow server: $SLEEPY_MS (default 20) ms per batch, the batch unchanged (so servers
    that sleep for different times serve the same batches)."""
    import os
    import time

    time.sleep(float(os.environ.get("SLEEPY_MS", "20")) / 1000)
    return batch


def tokenize_text(batch: dict, rng: np.random.Generator) -> dict:
    """A byte-level tokenizer: the str field ``text`` (a Ragged of UTF-8 bytes) -> ``ids``."""
    from batchfeed.shared.schema import Ragged

    text = batch["text"]
    return {"ids": Ragged(text.values.astype(np.int32), text.offsets), "label": batch["label"]}


def hang_on_row_500(batch: dict, rng: np.random.Generator) -> dict:
    """Never returns on the batch holding row 500 (a transform stuck on one input)."""
    import time

    while (batch["id"] == 500).any():
        time.sleep(1)
    return batch


def die_on_row_500(batch: dict, rng: np.random.Generator) -> dict:
    """Kills its worker on the batch holding row 500 (a crash in native code, say)."""
    import os
    import signal

    if (batch["id"] == 500).any():
        os.kill(os.getpid(), signal.SIGSEGV)
    return batch


def expand_past_the_samples(batch: dict, rng: np.random.Generator) -> dict:
    """Like ``expand``, but 4x wider still once past the rows the server samples at start, so
    that the output outgrows what the server sized it from."""
    img = batch["img"].astype(np.float64)
    if (batch["id"] >= 16).any():
        img = np.concatenate([img] * 4, axis=1)
    return {"id": batch["id"], "img": img}


def not_a_dict_on_row_96(batch: dict, rng: np.random.Generator) -> dict | list:
    """Returns garbage on the batch holding row 96 only (the sample at start passes)."""
    return [batch["id"]] if (batch["id"] == 96).any() else batch
