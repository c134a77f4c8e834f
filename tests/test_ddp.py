"""Data parallelism under torchrun: 2 ranks on the same global batch train like 1 rank.

Each rank packs the same global batch, keeps half of its rows and weights its loss by its share
of the batch's tokens; the averaged gradient is then the one-process gradient, up to float
summation order (one process runs 2 threads, each rank 1). So the logged losses and the final
weights of the two runs must agree to float tolerance, and would not if a rank dropped its
gradient, double-counted one, or trained on the wrong rows.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["train_teacher.py", "--preset", "tiny", "--steps", "6", "--eval-every", "3", "--batch-size", "8",
        "--n-test", "4", "--device", "cpu"]


def train(tmp_path, name, launcher):
    out = tmp_path / name / "teacher.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(launcher + ARGS + ["--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    log = [json.loads(line) for line in open(out.parent / "teacher.jsonl")]
    return torch.load(out, weights_only=True), log


def test_two_ranks_match_one_rank(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun is not installed beside this python")
    one, log1 = train(tmp_path, "one", [sys.executable])
    two, log2 = train(tmp_path, "two", [torchrun, "--standalone", "--nproc_per_node=2"])
    assert len(log1) == len(log2) == 3  # steps 3 and 6, then the final record: rank 1 wrote nothing
    for a, b in zip(log1[:2], log2[:2]):
        assert a["step"] == b["step"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    assert log1[0]["train_loss"] != pytest.approx(log1[1]["train_loss"], rel=1e-3)  # it did train
    assert one["metrics"]["val_loss"] == pytest.approx(two["metrics"]["val_loss"], rel=1e-5)
    # Adam moves an element by ~lr whatever its gradient's size, so a float-order difference in
    # a near-zero gradient can show as up to ~lr/100 in a weight: compare at that scale
    for k, w in one["model"].items():
        torch.testing.assert_close(two["model"][k], w, rtol=0, atol=1e-4, msg=k)
