"""Dispatcher calls as a device-independent measure of per-operator overhead."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


def count_aten_calls(run: Callable[[], Any]) -> int:
    """ATen operator calls (nested ones included) in one ``run()``: each is a trip through the
    dispatcher, and on a GPU most launch a kernel. Where the tensors are small, a pass costs about
    this count times the per-call overhead whatever its batch, so the count, unlike CPU seconds,
    carries over to a GPU."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))
