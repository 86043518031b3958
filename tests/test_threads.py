"""Threads: pathsurgeon's public calls are serialised by a process-wide lock, and what a trace patches
process-wide never reaches a model another thread runs. Threads are started together with a barrier."""

from __future__ import annotations

import threading

import timm
import torch

import pathsurgeon

MODEL = "test_vit"


def run_together(*functions) -> list[BaseException]:
    barrier = threading.Barrier(len(functions))
    errors: list[BaseException] = []

    def start(function):
        barrier.wait()
        try:
            function()
        except BaseException as error:  # noqa: BLE001 - collected and asserted on below
            errors.append(error)

    threads = [threading.Thread(target=start, args=(f,)) for f in functions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return errors


def test_two_threads_adding_at_once_both_succeed_and_leave_the_process_working():
    models = [timm.create_model(MODEL).eval() for _ in range(2)]
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    reports = []
    assert run_together(*(lambda m=m: reports.append(pathsurgeon.add(m, 0.1)) for m in models)) == []
    assert len(reports) == 2 and all(pathsurgeon.is_surgered(m) for m in models)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the forks were restored in order
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 4))  # any forward in the process still works
    fresh(torch.randn(1, 4))
    for model in models:
        pathsurgeon.strip(model)
        model(torch.randn(1, 3, *model.pretrained_cfg["input_size"][1:]))


def test_a_thread_running_another_model_is_not_traced_into_an_add():
    other = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    stop = threading.Event()
    steps = []

    def train():
        optimizer = torch.optim.SGD(other.parameters(), lr=0.01)
        while not stop.is_set():
            loss = other(torch.ones(4, 8)).sum()
            loss.backward()
            optimizer.step()
            steps.append(1)

    def surgery():
        try:
            for _ in range(3):
                model = timm.create_model(MODEL)
                pathsurgeon.add(model, 0.1)
        finally:
            stop.set()

    assert run_together(train, surgery) == []
    assert len(steps) > 0
