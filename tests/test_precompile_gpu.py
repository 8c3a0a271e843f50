"""Block graphs compiled in worker processes, then captured in a CUDA graph (CUDA only): the
workers' variants accept the training process's calls, nothing runs eagerly in the capture, and
the graphed steps compute eager's losses to bf16 tolerance (bench/parallel_capture.py runs them)."""
from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from parallel_capture import run  # noqa: E402  (bench/: the step as eri train runs it, with a log of misses)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_blocks_compiled_in_workers_capture_and_match_eager():
    args = Namespace(model="tiny", workers=2, steps=4, batch=2, size=32)
    eager, ours = run(args, compiled=False), run(args, compiled=True)
    assert ours["error"] is None, ours["error"]
    logs = [e["log"] for e in ours["events"] if "log" in e]
    assert logs == ["compile: 14 block graphs in 2 processes"], logs  # once, and every variant accepted
    assert not [e for e in ours["events"] if e.get("capturing")]  # no block ran eagerly inside a capture
    assert ours["variants"] == 14
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(eager["losses"]), rtol=2e-2, atol=2e-3)
