"""The token section's data: its corpora (documents of long-tailed random lengths, int32
token ids), written as the Arrow IPC file the servers load (and .npy files for torch ranks),
and torch's side of them: a ``Dataset`` of Python token lists with the usual padding collate."""

from __future__ import annotations

import functools
import itertools
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .common import MIB

ROW_LENGTH = 2048  # tokens per packed row
BATCH_ROWS = 16  # packed rows per batch
ISSUE_DOCUMENTS = 2_000_000  # the memory case as pytorch #13246 describes it


@dataclass(frozen=True)
class TokenCorpus:
    """Documents of log-normal lengths (a long tail, clipped) of uniform random token ids."""

    name: str
    documents: int
    median_length: float
    max_length: int
    sigma: float = 1.0
    vocab: int = 50_257

    def make(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``(values, offsets)``: int32 token ids back to back, and int64 offsets (N+1)."""
        rng = np.random.default_rng([seed, self.documents])
        lengths = rng.lognormal(np.log(self.median_length), self.sigma, self.documents)
        lengths = np.clip(lengths.astype(np.int64), 1, self.max_length)
        offsets = np.zeros(self.documents + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = rng.integers(0, self.vocab, int(offsets[-1]), dtype=np.int32)
        return values, offsets


@dataclass(frozen=True)
class TokenCorpora:
    """The section's three corpora.

    ``memory`` is short documents (sentences), scaled down from the issue's 2M token lists so
    that torch can hold it: as Python lists a token costs ~40 bytes per copy, and a torch rank
    and each of its forked workers end up with a copy.  ``issue`` has the issue's 2M documents
    at ``throughput``'s lengths, for batchfeed alone (torch would need ~6 x 13 GB).
    """

    throughput: TokenCorpus
    memory: TokenCorpus
    issue: TokenCorpus


def corpora(quick: bool) -> TokenCorpora:
    """The corpora; ``quick`` makes them tiny (for tests)."""
    if quick:
        return TokenCorpora(TokenCorpus("throughput", 4_000, 100, 8192),
                            TokenCorpus("memory", 4_000, 12, 1024),
                            TokenCorpus("issue", 8_000, 100, 8192))
    return TokenCorpora(TokenCorpus("throughput", 200_000, 100, 16_384),
                        TokenCorpus("memory", 500_000, 12, 1024),
                        TokenCorpus("issue", ISSUE_DOCUMENTS, 100, 16_384))


@dataclass(frozen=True)
class CorpusFiles:
    """A corpus on disk in ``directory``: the Arrow IPC file the servers load and, for torch
    ranks, ``values.npy`` and ``offsets.npy`` (read with numpy alone, not pyarrow)."""

    corpus: TokenCorpus
    directory: str
    arrow: str
    tokens: int
    arrow_bytes: int  # the Arrow buffers: int32 values and int32 offsets

    def describe(self) -> str:
        c = self.corpus
        return (f"{c.documents:,} documents, {self.tokens / 1e6:.1f}M int32 tokens (log-normal "
                f"lengths, median {c.median_length:g}, mean {self.tokens / c.documents:.0f}, "
                f"max {c.max_length:,}), Arrow {self.arrow_bytes / MIB:.1f} MiB")


def write_corpus(corpus: TokenCorpus, values: np.ndarray, offsets: np.ndarray,
                 directory: str, npy: bool = True) -> CorpusFiles:
    import pyarrow as pa
    import pyarrow.ipc

    os.makedirs(directory)
    column = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
    table = pa.table({"tokens": column})
    arrow = os.path.join(directory, f"{corpus.name}.arrow")
    with pa.ipc.new_file(arrow, table.schema) as writer:
        writer.write_table(table)
    if npy:
        np.save(os.path.join(directory, "values.npy"), values)
        np.save(os.path.join(directory, "offsets.npy"), offsets)
    return CorpusFiles(corpus, directory, arrow, len(values), table.nbytes)


def make_corpus(corpus: TokenCorpus, seed: int, directory: str, npy: bool = True) -> CorpusFiles:
    values, offsets = corpus.make(seed)
    return write_corpus(corpus, values, offsets, directory, npy)


def token_lists(values: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    """The corpus as Python lists of ints, the way a torch ``Dataset`` usually holds it."""
    flat = values.tolist()
    return [flat[a:b] for a, b in itertools.pairwise(offsets.tolist())]


class TokenLists:
    """A torch map-style ``Dataset`` of Python token lists."""

    def __init__(self, docs: list[list[int]]):
        self.docs = docs

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> list[int]:
        return self.docs[i]


def pad_collate(batch: list[list[int]], max_length: int) -> tuple[Any, Any]:
    """The usual padding ``collate_fn``: truncate, make tensors, pad to the batch's longest."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    rows = [torch.tensor(doc[:max_length], dtype=torch.int32) for doc in batch]
    lengths = torch.tensor([len(r) for r in rows])
    return pad_sequence(rows, batch_first=True, padding_value=0), lengths


def torch_loader(docs: list[list[int]], batch_size: int, max_length: int, seed: int,
                 workers: int, sampler: Any = None) -> Any:
    """DataLoader with ``workers`` persistent workers (the baseline at its best: small
    epochs do not pay a restart, and the workers live on to be measured), forked as on Linux by
    default (a spawned rank would otherwise spawn them too, each unpickling the whole corpus)."""
    import torch
    from torch.utils.data import DataLoader

    dataset: Any = TokenLists(docs)  # a map-style Dataset (torch is imported lazily here)
    return DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None,
                      sampler=sampler, num_workers=workers, persistent_workers=True,
                      collate_fn=functools.partial(pad_collate, max_length=max_length),
                      generator=torch.Generator().manual_seed(seed),
                      multiprocessing_context="fork")


def torch_docs_per_batch(offsets: np.ndarray, row_length: int, batch_rows: int) -> int:
    """As many documents as a packed batch holds tokens, on average (lengths truncated)."""
    mean = float(np.minimum(np.diff(offsets), row_length).mean())
    return max(1, round(batch_rows * row_length / mean))


def describe(files: CorpusFiles) -> dict[str, Any]:
    return {**asdict(files.corpus), "tokens": files.tokens, "arrow_bytes": files.arrow_bytes,
            "description": files.describe()}
