"""GRAD-MATCH-PB through your own DataLoader (python examples/own_dataloader.py [--strategy random|full|...]).

The DataLoader keeps its workers, pinning and collate_fn; the client's batch sampler hands it each epoch's
mini-batches of the adopted subset, and subset.weights(ids) gives the batch's weights.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader

from trainer.api import AdaptiveSubset
from trainer.integrations.sampler import IndexedDataset, with_indices


class Digits(torch.utils.data.Dataset):  # any map-style Dataset of (input, int label)
    def __init__(self, rows: slice):
        digits = load_digits()
        self.x = torch.tensor(digits.data[rows], dtype=torch.float32) / 16
        self.y = digits.target[rows].tolist()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


parser = argparse.ArgumentParser()
parser.add_argument("--strategy", default="gradmatch-pb")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

torch.manual_seed(args.seed)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
train, test = Digits(slice(0, 1500)), Digits(slice(1500, None))

began = time.perf_counter()
# epochs of 300 examples take milliseconds here, so a late subset is waited for (on_late="wait")
with AdaptiveSubset(model, train, strategy=args.strategy, budget=0.2, epochs=30, select_every=5, kappa=0.5,
                    batch_size=32, on_late="wait", seed=args.seed) as subset:
    loader = DataLoader(IndexedDataset(train), batch_sampler=subset.batch_sampler(), collate_fn=with_indices(),
                        num_workers=1, persistent_workers=True)
    seen = []
    for epoch in range(subset.epoch_plan.total):
        seen.append(0)
        for ids, (x, y) in loader:  # each pass over the loader is one epoch: the rounds run at its start
            loss = (subset.weights(ids) * F.cross_entropy(model(x), y, reduction="none")).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen[-1] += len(ids)
    summary = subset.summary()
seconds = time.perf_counter() - began
print({k: summary[k] for k in ("strategy", "rounds", "epochs_run", "steps", "stall_s")})
print(f"examples per epoch {seen}")
with torch.no_grad():
    accuracy = 100 * (model(test.x).argmax(1) == torch.tensor(test.y)).float().mean()
print(f"test accuracy {accuracy:.1f} % in {seconds:.1f} s")
