"""Your own loop, data-parallel with Ray Train, GRAD-MATCH-PB choosing the subset (python examples/ray_train_loop.py).

Inside a Ray Train worker ``AdaptiveSubset`` finds the ``torch.distributed`` group by itself: rank 0 runs the
selection rounds and shares each new subset, and every rank gets its share of each mini-batch with weights
scaled so that DDP's mean of the gradients is the whole batch's gradient. The loop is the one-process loop.
"""

import os
import tempfile

import ray
import ray.train
import ray.train.torch
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


def train_loop(config: dict) -> None:
    torch.manual_seed(0)  # the same initial weights on every rank
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    train, test = Digits(slice(0, 1500)), Digits(slice(1500, None))
    with AdaptiveSubset(model, train, strategy="gradmatch-pb", budget=0.2, epochs=config["epochs"], select_every=5,
                        kappa=0.5, batch_size=32, on_late="wait") as subset:
        ddp = ray.train.torch.prepare_model(model)  # DDP; the selection reads the plain model
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        for epoch, batches in subset:
            for x, y, w in batches:  # this rank's share of each batch, w scaled to match
                loss = (w * F.cross_entropy(ddp(x), y, reduction="none")).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        summary = subset.summary()
    if ray.train.get_context().get_world_rank() == 0:  # rank 0 hands over the trained weights and its counts
        with torch.no_grad():
            accuracy = 100 * (model(test.x).argmax(1) == torch.tensor(test.y)).float().mean()
        with tempfile.TemporaryDirectory() as folder:
            torch.save(model.state_dict(), os.path.join(folder, "model.pt"))
            ray.train.report({"acc": float(accuracy), "rounds": summary["rounds"], "steps": summary["steps"]},
                             checkpoint=ray.train.Checkpoint.from_directory(folder))
    else:
        ray.train.report({})


if __name__ == "__main__":
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False)
    with tempfile.TemporaryDirectory() as storage:
        result = ray.train.torch.TorchTrainer(
            train_loop, train_loop_config={"epochs": 30},
            scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(storage_path=storage, name="digits"),
        ).fit()
        with result.checkpoint.as_directory() as folder:
            weights = torch.load(os.path.join(folder, "model.pt"), weights_only=True)
    print(f"test accuracy {result.metrics['acc']:.1f} %, rounds {result.metrics['rounds']}, "
          f"steps {result.metrics['steps']}, trained weights: {len(weights)} tensors")
