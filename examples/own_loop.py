"""GRAD-MATCH-PB in a plain PyTorch loop: your model, your Dataset, your optimizer (python examples/own_loop.py)."""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from trainer import AdaptiveSubset


class Digits(torch.utils.data.Dataset):  # any map-style Dataset of (input, int label)
    def __init__(self, rows: slice):
        digits = load_digits()
        self.x = torch.tensor(digits.data[rows], dtype=torch.float32) / 16
        self.y = digits.target[rows].tolist()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
train, test = Digits(slice(0, 1500)), Digits(slice(1500, None))

# epochs of 300 examples take milliseconds here, so a late subset is waited for (on_late="wait")
with AdaptiveSubset(model, train, strategy="gradmatch-pb", budget=0.2, epochs=30, select_every=5, kappa=0.5,
                    batch_size=32, on_late="wait") as subset:
    for epoch, batches in subset:
        for x, y, w in batches:  # w: the subset's weights, mean 1
            loss = (w * F.cross_entropy(model(x), y, reduction="none")).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(subset.summary())

with torch.no_grad():
    print(f"test accuracy {100 * (model(test.x).argmax(1) == torch.tensor(test.y)).float().mean():.1f} %")
