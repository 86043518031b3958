"""Examples run as smoke tests: a few steps of each example's code path, never its full settings.

The examples' results (docs/finetune_digits.png and its numbers) come from running them in full, by hand:
their speed and accuracy are measurements, not test assertions.
"""

from __future__ import annotations

import json

import pytest


def _example(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_loop_example_trains_each_step_at_fn_of_the_step(caplog):
    from pathsurgeon.schedulers import Warmup

    with caplog.at_level("INFO", logger="train"):
        rates = _example("rate_over_training").main(["--steps", "4", "--warmup", "2", "--log-every", "1"])
    assert rates == [Warmup(0.2, 2)(k) for k in range(4)]
    assert sum("drop_path_rate" in record.getMessage() for record in caplog.records) == 4


@pytest.mark.slow
def test_finetune_digits_example_runs_all_variants_and_plots(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    import torch

    threads = torch.get_num_threads()
    try:
        result = _example("finetune_digits").main([
            "--seeds", "2", "--epochs", "2", "--pretrain-epochs", "1", "--pretrain-images", "64", "--per-class", "4",
            "--depth", "2", "--width", "32", "--eval-every", "1", "--threads", "1", "--out", str(tmp_path),
        ])
    finally:
        torch.set_num_threads(threads)
    assert set(result["summary"]) == {"rate 0", "sample", "skip"}
    assert all(len(curves) == 2 and len(curves[0]) == 2 for curves in result["runs"].values())
    saved = json.loads((tmp_path / "finetune_digits.json").read_text())
    assert saved["summary"] == result["summary"]
    assert (tmp_path / "finetune_digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
