"""GRAD-MATCH-PB in the Hugging Face Trainer (python examples/hf_trainer.py [--strategy random|full|...]).

A tiny BERT built from a config (nothing is downloaded) classifies synthetic token sequences into 3 classes: the
class is the one of the tokens {8, 9, 10} that occurs most often among random tokens. Needs
pip install 'gradmatch[hf]'.
"""

import argparse
import time

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from trainer.integrations.hf import AdaptiveSubsetTrainer


class Tokens(torch.utils.data.Dataset):  # a map-style dataset of dicts, as a tokenizer makes them
    def __init__(self, n: int, seed: int, length: int = 16):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(11, 64, (n, length), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        for i in range(n):  # the class's token 4 times, the others twice at most: the label is the majority token
            slots = torch.randperm(length - 1, generator=g)[:8] + 1
            others = [c for c in range(3) if c != int(self.labels[i])]
            fill = [8 + int(self.labels[i])] * 4 + [8 + others[0]] * int(torch.randint(0, 3, (1,), generator=g)) \
                + [8 + others[1]] * int(torch.randint(0, 3, (1,), generator=g))
            self.ids[i, slots[:len(fill)]] = torch.tensor(fill)
        self.ids[:, 0] = 2  # [CLS]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": int(self.labels[i])}


parser = argparse.ArgumentParser()
parser.add_argument("--strategy", default="gradmatch-pb")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="/tmp/gradmatch-hf")
args = parser.parse_args()

torch.manual_seed(args.seed)
config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    num_labels=3, max_position_embeddings=32)
model = BertForSequenceClassification(config)
train, test = Tokens(1200, seed=1), Tokens(600, seed=2)

training = TrainingArguments(output_dir=args.out, num_train_epochs=30, per_device_train_batch_size=32,
                             learning_rate=3e-3, seed=args.seed, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
# epochs of 240 examples take a fraction of a second here, so a late subset is waited for (on_late="wait")
trainer = AdaptiveSubsetTrainer(model=model, args=training, train_dataset=train,
                                subset=dict(strategy=args.strategy, budget=0.2, select_every=5, kappa=0.5,
                                            on_late="wait"))
began = time.perf_counter()
trainer.train()
seconds = time.perf_counter() - began
print({k: trainer.subset_summary[k] for k in ("strategy", "rounds", "epochs_run", "steps", "stall_s")})
print(f"examples per epoch {trainer.seen_per_epoch}")
model.eval()
with torch.no_grad():
    logits = model(input_ids=test.ids, attention_mask=torch.ones_like(test.ids)).logits
print(f"test accuracy {100 * (logits.argmax(1) == test.labels).float().mean():.1f} % in {seconds:.1f} s")
