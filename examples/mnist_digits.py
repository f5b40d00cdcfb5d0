"""The pytorch/examples MNIST loop, on scikit-learn's 8x8 digits served by batchfeed.

    python3 examples/mnist_digits.py --epochs 3

``train()`` and ``test()`` are the classic loop of pytorch/examples ``mnist/main.py`` (a small
CNN, ``F.nll_loss``, Adadelta with a StepLR).  Only the training loader changed, by one line:

    train_loader = DataLoader(BatchfeedDataset(address, batch_size=64, seed=1,
                                               as_tuple=("x", "y")), batch_size=None)

in place of ``DataLoader(datasets.MNIST(...), batch_size=64, shuffle=True)``.  The script serves
the digits itself with ``batchfeed.serve`` (a server in a child process, stopped at exit);
``--address`` trains from a running server instead, which must serve the same ``x`` and ``y``
(it then knows nothing of the split: serve the training rows only).

Two things differ for a loop that switches:
- ``len(train_loader.dataset)`` is the number of batches per epoch, not of rows: the progress
  line takes the row count from ``dataset.client.rows``;
- the images arrive as the server holds them (here normalised once, before serving),
  since there is no torchvision transform in the loader.

Each epoch prints the classic lines, then ``epoch E: mean loss ..., N samples/s, waiting on data
P%, order <digest>`` (the digest is of the epoch's rows in the order they came: a new order
gives a new digest).  The last lines, ``losses: ...``, ``orders: ...`` and ``test accuracy:
...``, are for scripts to read.

Needs torch and scikit-learn (``pip install torch scikit-learn``): its ``load_digits()`` ships
the 1,797 images, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn, optim
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader, TensorDataset

import batchfeed
from batchfeed.client.torch_data import BatchfeedDataset


class Net(nn.Module):
    """pytorch/examples' MNIST CNN, sized for 8x8 inputs (8 -> 6 -> 4 -> pooled 2)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(64 * 2 * 2, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


def train(args, model, device, train_loader, optimizer, epoch):
    """One epoch; returns its mean loss and a digest of the rows in the order they came."""
    model.train()
    client = train_loader.dataset.client
    t0, wait0 = time.perf_counter(), client.stats()["wait_s"]
    loss_sum, samples, order = 0.0, 0, hashlib.sha1()
    for batch_idx, (data, target) in enumerate(train_loader):
        order.update(data.numpy().tobytes())
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(data)
        samples += len(data)
        if batch_idx % args.log_interval == 0:
            print(f"Train Epoch: {epoch} [{batch_idx * args.batch_size}/{client.rows} "
                  f"({100.0 * batch_idx / len(train_loader):.0f}%)]\tLoss: {loss.item():.6f}")
    elapsed = time.perf_counter() - t0
    waited = client.stats()["wait_s"] - wait0
    mean_loss = loss_sum / max(samples, 1)
    print(f"epoch {epoch}: mean loss {mean_loss:.4f}, {samples / elapsed:,.0f} samples/s, "
          f"waiting on data {waited / elapsed:.1%}, order {order.hexdigest()[:12]}", flush=True)
    return mean_loss, order.hexdigest()[:12]


def test(model, device, test_loader):
    """Prints and returns the test set's accuracy."""
    model.eval()
    test_loss = 0
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            pred = output.argmax(dim=1, keepdim=True)
            correct += pred.eq(target.view_as(pred)).sum().item()
    test_loss /= len(test_loader.dataset)
    n = len(test_loader.dataset)
    print(f"\nTest set: Average loss: {test_loss:.4f}, Accuracy: {correct}/{n} "
          f"({100.0 * correct / n:.0f}%)\n", flush=True)
    return correct / n


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--test-batch-size", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1.0, help="Adadelta's learning rate")
    p.add_argument("--gamma", type=float, default=0.7, help="the StepLR's decay per epoch")
    p.add_argument("--seed", type=int, default=1, help="the model's and the batch order's seed")
    p.add_argument("--log-interval", type=int, default=10, help="batches between log lines")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--address", help="train from this running server instead of serving the "
                                      "digits here")
    return p.parse_args(argv)


def digits():
    """(x_train, x_test, y_train, y_test): images float32 (N, 1, 8, 8), labels int64.

    The pixels (0..16) are normalised as MNIST's ``Normalize((0.1307,), (0.3081,))`` does, with
    the training images' mean and standard deviation, once, before serving.
    """
    data = load_digits()
    x = data.data.astype(np.float32).reshape(-1, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(
        x, data.target.astype(np.int64), test_size=0.2, random_state=0)
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, (x_test - mean) / std, y_train, y_test


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    x_train, x_test, y_train, y_test = digits()
    # Serve before the first training step: serve() forks, best done before threads start.
    server = None if args.address else batchfeed.serve({"x": x_train, "y": y_train}, workers=1)
    address = args.address or server.address
    try:
        train_loader = DataLoader(BatchfeedDataset(address, batch_size=args.batch_size,
                                                   seed=args.seed, as_tuple=("x", "y")),
                                  batch_size=None)
        test_loader = DataLoader(TensorDataset(torch.from_numpy(x_test),
                                               torch.from_numpy(y_test)),
                                 batch_size=args.test_batch_size)
        model = Net().to(device)
        optimizer = optim.Adadelta(model.parameters(), lr=args.lr)
        scheduler = StepLR(optimizer, step_size=1, gamma=args.gamma)
        losses, orders, accuracy = [], [], 0.0
        for epoch in range(1, args.epochs + 1):
            loss, order = train(args, model, device, train_loader, optimizer, epoch)
            losses.append(loss)
            orders.append(order)
            accuracy = test(model, device, test_loader)
            scheduler.step()
        stats = train_loader.dataset.client.stats()
        print(f"done: {stats['batches']:,.0f} batches in {stats['wall_s']:.1f} s, waiting on "
              f"data {stats['wait_fraction']:.1%} of the time")
        train_loader.dataset.close()
    finally:
        if server is not None:
            server.stop()
    print("losses: " + " ".join(f"{loss:.4f}" for loss in losses))
    print("orders: " + " ".join(orders))
    print(f"test accuracy: {accuracy:.4f}", flush=True)


if __name__ == "__main__":
    main()
