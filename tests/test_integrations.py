"""Trainer integrations: the rate each optimizer step trains with is fn(step), and the trainer logs it.

The rate a step used is read from the inserted DropPath modules as the forward runs, never taken from
the callback itself; the expected rates come from the scheduler's own function and ``set_rate``.
"""

from __future__ import annotations

import copy
import csv

import pytest
import timm
import torch
from torch import nn

import pathsurgeon
from pathsurgeon import DropPath, RateScheduler

BATCH, STEPS = 4, 4


def tiny_timm_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=2
    )


def watch_rates(model: nn.Module) -> list[float]:
    """The largest rate among the inserted DropPath modules at each training forward of ``model``."""
    from pathsurgeon import changes

    seen: list[float] = []
    # slots are submodules, hooks (HF ViT) are not: the record holds every inserted DropPath
    drops = [change.drop for change in vars(model)[changes.RECORD_ATTRIBUTE].changes]
    assert drops and all(isinstance(d, DropPath) for d in drops)

    def record(module, args):
        if module.training:
            seen.append(max(d.rate for d in drops))

    model.register_forward_pre_hook(record)
    return seen


def largest_rate_after_set_rate(model: nn.Module, rate: float) -> float:
    twin = copy.deepcopy(model)
    pathsurgeon.set_rate(twin, rate)
    return max(b.rate for b in pathsurgeon.find(twin))


# --- Hugging Face Trainer -------------------------------------------------------------------------------


transformers = pytest.importorskip("transformers")


class Images(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        return {"pixel_values": torch.randn(3, 32, 32, generator=generator), "labels": index % 2}


def hf_vit():
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=2,
    )
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(config)


def hf_trainer(model, scheduler, out, **overrides):
    from pathsurgeon.integrations.transformers import DropPathCallback

    settings = dict(
        output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=STEPS, report_to=[], logging_steps=1,
        save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    args = transformers.TrainingArguments(**{**settings, **overrides})
    return transformers.Trainer(
        model=model, args=args, train_dataset=Images(), callbacks=[DropPathCallback(scheduler)]
    )


@pytest.mark.slow
def test_hf_callback_sets_each_steps_rate_and_logs_it(tmp_path):
    model = hf_vit()
    pathsurgeon.add(model, 0.1)
    scheduler = RateScheduler.warmup(model, 0.3, steps=3)
    seen = watch_rates(model)
    trainer = hf_trainer(model, scheduler, tmp_path, gradient_accumulation_steps=2)
    trainer.train()
    # two micro-batches per optimizer step, both at that step's rate
    expected = [largest_rate_after_set_rate(model, scheduler.rate_at(k)) for k in range(STEPS)]
    assert seen == [rate for rate in expected for _ in range(2)]
    logged = [(entry["step"], entry["drop_path_rate"]) for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [(k + 1, scheduler.rate_at(k)) for k in range(STEPS)]  # step k+1's log: step k's rate


@pytest.mark.slow
def test_hf_resume_continues_the_schedule(tmp_path):
    model = hf_vit()
    pathsurgeon.add(model, 0.1)
    scheduler = RateScheduler.early(model, 0.4, until=STEPS, decay="linear")
    hf_trainer(model, scheduler, tmp_path, save_strategy="steps", save_steps=2).train()

    resumed = hf_vit()
    pathsurgeon.add(resumed, 0.1)
    resumed_scheduler = RateScheduler.early(resumed, 0.4, until=STEPS, decay="linear")
    seen = watch_rates(resumed)
    hf_trainer(resumed, resumed_scheduler, tmp_path).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert seen == [largest_rate_after_set_rate(resumed, scheduler.rate_at(k)) for k in (2, 3)]


def test_hf_callback_needs_a_scheduler():
    from pathsurgeon.integrations.transformers import DropPathCallback

    with pytest.raises(pathsurgeon.PathSurgeonError, match="RateScheduler"):
        DropPathCallback(0.1)


# --- Lightning -----------------------------------------------------------------------------------------


def test_lightning_callback_sets_each_steps_rate_and_logs_it(tmp_path):
    lightning = pytest.importorskip("lightning.pytorch")
    from pathsurgeon.integrations.lightning import DropPathCallback

    class Classifier(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_timm_vit()

        def training_step(self, batch, batch_idx):
            images, labels = batch
            return nn.functional.cross_entropy(self.model(images), labels)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    module = Classifier()
    pathsurgeon.add(module.model, 0.1)
    scheduler = RateScheduler.late(module.model, 0.2, start=2)
    seen = watch_rates(module.model)
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 3, 32, 32, generator=generator), torch.arange(32) % 2)
    trainer = lightning.Trainer(
        max_steps=STEPS, accelerator="cpu", devices=1, logger=lightning.loggers.CSVLogger(tmp_path),
        log_every_n_steps=1, callbacks=[DropPathCallback(scheduler)], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=BATCH))
    assert seen == [largest_rate_after_set_rate(module.model, scheduler.rate_at(k)) for k in range(STEPS)]
    with open(trainer.logger.experiment.metrics_file_path) as file:
        rows = [row for row in csv.DictReader(file) if row.get("drop_path_rate")]
    assert [(int(row["step"]), float(row["drop_path_rate"])) for row in rows] == [
        (k, pytest.approx(scheduler.rate_at(k))) for k in range(STEPS)
    ]

