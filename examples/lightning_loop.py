"""GRAD-MATCH-PB in PyTorch Lightning (python examples/lightning_loop.py [--strategy random|full|...]).

The LightningModule's training_step weights its loss; the callback runs the rounds and feeds the subset through
the training DataLoader. Needs pip install 'gradmatch[lightning]'.
"""

import argparse
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from trainer.integrations.lightning import AdaptiveSubsetCallback, weighted_loss


class Digits(torch.utils.data.Dataset):  # any map-style Dataset of (input, int label)
    def __init__(self, rows: slice):
        digits = load_digits()
        self.x = torch.tensor(digits.data[rows], dtype=torch.float32) / 16
        self.y = digits.target[rows].tolist()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        ids, (x, y) = batch  # the example ids come first
        return weighted_loss(self, F.cross_entropy(self(x), y, reduction="none"), ids)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


parser = argparse.ArgumentParser()
parser.add_argument("--strategy", default="gradmatch-pb")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

torch.manual_seed(args.seed)
model = Classifier()
train, test = Digits(slice(0, 1500)), Digits(slice(1500, None))

# epochs of 300 examples take milliseconds here, so a late subset is waited for (on_late="wait")
subset = AdaptiveSubsetCallback(train, strategy=args.strategy, budget=0.2, epochs=30, select_every=5, kappa=0.5,
                                batch_size=32, on_late="wait", seed=args.seed)
trainer = pl.Trainer(max_epochs=subset.epochs, callbacks=[subset], reload_dataloaders_every_n_epochs=1,
                     accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False)
began = time.perf_counter()
trainer.fit(model, subset.dataloader())
seconds = time.perf_counter() - began
print({k: subset.summary[k] for k in ("strategy", "rounds", "epochs_run", "steps", "stall_s")})
print(f"examples per epoch {subset.seen_per_epoch}")
with torch.no_grad():
    accuracy = 100 * (model(test.x).argmax(1) == torch.tensor(test.y)).float().mean()
print(f"test accuracy {accuracy:.1f} % in {seconds:.1f} s")
