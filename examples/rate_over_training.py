"""A plain training loop with the drop-path rate changing over training: linear warm-up, then constant.

The scheduler steps right after the optimizer, like an LR scheduler, so step k trains at fn(k); the rate
is logged with Python's logging next to the loss and the learning rate. Offline: random weights and
random images, a few seconds on a CPU.

    python examples/rate_over_training.py [--steps 40] [--warmup 20] [--rate 0.2]
"""

from __future__ import annotations

import argparse
import logging

import timm
import torch

import pathsurgeon

log = logging.getLogger("train")


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=20, help="steps of linear warm-up of the rate")
    parser.add_argument("--rate", type=float, default=0.2, help="the rate after warm-up")
    parser.add_argument("--log-every", type=int, default=5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)
    pathsurgeon.add(model, args.rate)  # the schedule over depth: timm's linear one, as for drop_path_rate
    scheduler = pathsurgeon.RateScheduler.warmup(model, args.rate, steps=args.warmup)  # now at fn(0) = 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lr_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

    rates = []
    model.train()
    for step in range(args.steps):
        images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rates.append(scheduler.rate)  # the rate this step trained with
        if step % args.log_every == 0 or step == args.steps - 1:
            log.info("step %d: loss %.3f, lr %.2e, drop_path_rate %.3f",
                     step, loss.item(), lr_scheduler.get_last_lr()[0], scheduler.rate)
        lr_scheduler.step()
        scheduler.step()  # after the optimizer: the next step trains at fn(step + 1)

    pathsurgeon.strip(model)  # before saving or exporting
    log.info("stripped; %d training steps, rate %.3f at the end", args.steps, rates[-1])
    return rates


if __name__ == "__main__":
    main()
