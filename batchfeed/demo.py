"""``batchfeed demo``: the main job, end to end, on the built-in synthetic dataset.

It starts ``batchfeed serve`` as a separate process, then runs ``trainers`` data-parallel trainer
processes (ranks 0..W-1).  Each trains a softmax classifier with plain numpy SGD on its rank's
batches and reports loss, accuracy, samples/s and the share of time it waited on data.  Each
rank trains its own replica (there is no gradient exchange in this demo): the point is the data
path, which is the one a real DDP job would use.
"""

from __future__ import annotations

import multiprocessing
import sys
import time

import numpy as np

from batchfeed.launch import ServerProcess


def softmax_step(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray,
                 lr: float) -> tuple[float, float]:
    """One SGD step of multinomial logistic regression; returns (loss, accuracy)."""
    logits = x @ w + b
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(-np.log(p[np.arange(n), y] + 1e-12).mean())
    acc = float((p.argmax(axis=1) == y).mean())
    p[np.arange(n), y] -= 1.0
    p /= n
    w -= lr * (x.T @ p)
    b -= lr * p.sum(axis=0)
    return loss, acc


def train_rank(address: str, rank: int, world: int, epochs: int, batch_size: int,
               results: multiprocessing.Queue) -> None:
    from batchfeed import Client

    w = np.zeros((64, 10), np.float32)
    b = np.zeros(10, np.float32)
    with Client(address, batch_size=batch_size, seed=0, rank=rank, world_size=world,
                name=f"demo-rank{rank}") as client:
        for epoch in range(epochs):
            t0, losses, accs, rows = time.perf_counter(), [], [], 0
            wait0 = client.stats()["wait_s"]
            for batch in client.epoch(epoch):
                loss, acc = softmax_step(w, b, batch["x"], batch["y"], lr=0.5)
                losses.append(loss)
                accs.append(acc)
                rows += len(batch["y"])
            dt = time.perf_counter() - t0
            waited = client.stats()["wait_s"] - wait0
            results.put((rank, epoch, float(np.mean(losses)), float(np.mean(accs)), rows / dt,
                         waited / dt))


def run_demo(rows: int = 1_000_000, epochs: int = 3, trainers: int = 2, batch_size: int = 256,
             workers: int = 0) -> int:
    server_args = ["--synthetic-rows", str(rows)]
    if workers:
        server_args += ["--workers", str(workers)]
    print(f"batchfeed demo: starting a server on {rows:,} synthetic rows ...", flush=True)
    with ServerProcess(server_args) as server:
        print(server.ready_line, flush=True)
        ctx = multiprocessing.get_context("spawn")
        results: multiprocessing.Queue = ctx.Queue()
        procs = [ctx.Process(target=train_rank,
                             args=(server.address, r, trainers, epochs, batch_size, results))
                 for r in range(trainers)]
        for p in procs:
            p.start()
        print(f"{'rank':>4} {'epoch':>5} {'loss':>7} {'acc':>6} {'samples/s':>11} {'waiting':>8}")
        expected = trainers * epochs
        done = 0
        while done < expected:
            try:
                rank, epoch, loss, acc, rate, waiting = results.get(timeout=1.0)
            except Exception:  # queue.Empty: check the trainers are still alive
                if all(not p.is_alive() for p in procs):
                    break
                continue
            done += 1
            print(f"{rank:>4} {epoch:>5} {loss:>7.4f} {acc:>6.3f} {rate:>11,.0f} {waiting:>7.1%}",
                  flush=True)
        for p in procs:
            p.join(30)
        failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed or done < expected:
        print(f"batchfeed demo: a trainer failed (exit codes {failed})", file=sys.stderr)
        return 1
    print("batchfeed demo: done; the loss falls epoch after epoch on every rank.")
    print("(waiting: the share of each rank's time spent waiting for its next batch.  A numpy "
          "softmax step on 256 rows takes microseconds, so these trainers run as fast as the "
          "data comes and the share shows the service's rate, highest in epoch 0 while the "
          "ranks start together; a real model's step is slower and the share falls toward 0: "
          "`batchfeed bench` measures a trainer at half the service's rate.)")
    return 0
