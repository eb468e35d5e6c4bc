"""Hugging Face Trainer: a tiny BERT built from a config, trained on CPU on synthetic tokenised examples."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from trainer.integrations.hf import AdaptiveSubsetTrainer  # noqa: E402

from scripts import run_example  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    """Dicts of input_ids, attention_mask, labels: the label is the class token (8, 9 or 10) that fills half of the
    sequence."""

    def __init__(self, n: int, seed: int, length: int = 12):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(11, 64, (n, length), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        for i in range(n):
            self.ids[i, torch.randperm(length - 1, generator=g)[:length // 2] + 1] = 8 + self.labels[i]
        self.ids[:, 0] = 2

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": int(self.labels[i])}


def tiny_bert():
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, num_labels=3, max_position_embeddings=16)
    return transformers.BertForSequenceClassification(config)


def arguments(tmp_path, **options):
    return transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=10,
                                          per_device_train_batch_size=16, learning_rate=5e-3, seed=3, use_cpu=True,
                                          report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                                          **options)


@pytest.mark.ray
def test_hf_trainer_trains_on_the_adopted_subsets(ray_address, tmp_path):
    torch.manual_seed(0)
    model, data = tiny_bert(), Tokens(320, seed=1)
    seen = {}
    trainer = AdaptiveSubsetTrainer(model=model, args=arguments(tmp_path), train_dataset=data,
                                    subset=dict(strategy="gradmatch-pb", budget=0.2, select_every=2, kappa=0.5,
                                                on_late="wait", tensorboard=str(tmp_path / "tb")))
    original = trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        seen.setdefault(len(trainer.seen_per_epoch), []).append(inputs["example_ids"].cpu())
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    assert trainer.args.num_train_epochs == 6  # 1 full epoch (warm start) + 5 on subsets of the budget of 10
    trainer.train()
    assert [r["status"] for r in trainer.subset_records] == ["adopted"] * 3, trainer.subset_records
    summary = trainer.subset_summary
    assert summary["epochs_run"] == 6 and summary["steps"] == trainer.state.global_step == trainer.planned_steps()
    assert sorted(torch.cat(seen[0]).tolist()) == list(range(320))
    for epoch in range(1, 6):  # the PB subset: 4 of the 20 fixed mini-batches of 16, each example once
        ids = torch.cat(seen[epoch]).tolist()
        assert len(ids) == len(set(ids)) == 64, (epoch, len(ids))
    assert trainer.seen_per_epoch == [320] + [64] * 5
    assert set(torch.cat(seen[5]).tolist()) == set(torch.cat(trainer.client.subset.batches).tolist())
    test = Tokens(300, seed=2)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=test.ids, attention_mask=torch.ones_like(test.ids)).logits
    assert (logits.argmax(1) == test.labels).float().mean() > 0.5  # chance: 1/3
    # tensorboard=: each epoch's loss and the learning rate of the Trainer's (linearly decaying) schedule
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    reader = accumulator.EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    reader.Reload()
    lrs = [(event.step, event.value) for event in reader.Scalars("epoch/lr")]
    assert [step for step, _ in lrs] == list(range(6))
    assert all(5e-3 > a >= b >= 0 for (_, a), (_, b) in zip(lrs, lrs[1:])), lrs
    assert [event.step for event in reader.Scalars("epoch/loss")] == list(range(6))


def test_hf_settings_are_checked_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="subset epochs=5: set by TrainingArguments"):
        AdaptiveSubsetTrainer(model=tiny_bert(), args=arguments(tmp_path), train_dataset=Tokens(64, 1),
                              subset=dict(epochs=5))
    with pytest.raises(ValueError, match="max_steps 7: the subset schedule fixes the steps"):
        AdaptiveSubsetTrainer(model=tiny_bert(), args=arguments(tmp_path, max_steps=7), train_dataset=Tokens(64, 1))


@pytest.mark.ray
def test_the_hf_example_runs(ray_address):
    import re

    stdout = run_example("hf_trainer.py", ray_address, timeout_s=500)
    accuracy = float(re.search(r"test accuracy ([\d.]+) %", stdout).group(1))
    rounds = int(re.search(r"'rounds': (\d+)", stdout).group(1))
    assert accuracy > 45 and rounds >= 1, stdout
