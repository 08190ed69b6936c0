"""scripts/bench/batch_memory.py: its settings parse into the options the module runs with (the GPU calls are
prepared as command lines; a typo there costs device time)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("batch_memory", REPO / "scripts" / "bench" / "batch_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through the module registry
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_a_setting_parses_every_memory_flag(bench) -> None:
    setting = bench.Setting.parse("cached:64:16:t5600:gc:off:v4:r4:sparse")
    assert (setting.mode, setting.batch, setting.mini_batch, setting.tokens) == ("cached", 64, 16, 5600)
    assert setting.checkpointing and setting.offload and setting.sparse_embedding
    assert (setting.vision_images, setting.text_rows) == (4, 4)
    assert bench.Setting.parse(str(setting)) == setting
    assert not bench.Setting.parse("cached:64:16:gc").sparse_embedding


@pytest.mark.parametrize("text, message", [("cached:64:16:r4", "add gc"), ("cached:64:16:v2", "add gc"),
                                           ("cached:64:16:gc:r0", "unknown flag"), ("cached:64", "mini-batch")])
def test_a_bad_setting_is_refused_before_anything_runs(bench, text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        bench.Setting.parse(text)


def test_the_peak_composition_replays_the_allocation_trace(bench, tmp_path, capsys, monkeypatch) -> None:
    """A made-up trace in the format of ``torch.cuda.memory._snapshot()``: the live blocks at the largest total, grouped
    by the innermost frame in vdr/transformers/lightning code."""

    def frames(*names: str) -> list[dict]:
        return [{"filename": f"/x/site-packages/{name.split(':')[0]}", "line": 1, "name": name.split(":")[1]}
                for name in names]

    embed = frames("torch/nn/functional.py:embedding", "vdr/models/biencoder.py:forward")
    layer = frames("torch/nn/modules/linear.py:forward", "transformers/models/qwen3_vl/modeling_qwen3_vl.py:mlp")
    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": embed},
        {"action": "alloc", "addr": 2, "size": 50, "frames": layer},
        {"action": "alloc", "addr": 3, "size": 30, "frames": layer},
        {"action": "free_requested", "addr": 1, "size": 100, "frames": []},
        {"action": "free_completed", "addr": 1, "size": 100, "frames": []},  # the total falls to 80
        {"action": "alloc", "addr": 4, "size": 60, "frames": frames("torch/autograd/graph.py:backward")},  # 140
        {"action": "free_completed", "addr": 4, "size": 60, "frames": []},
    ]
    peak, groups = bench.peak_composition({"device_traces": [trace]})
    assert peak == 180
    assert groups == [("vdr/models/biencoder.py:1 forward", 100, 1),
                      ("transformers/models/qwen3_vl/modeling_qwen3_vl.py:1 mlp", 80, 2)]
    assert bench.Setting.parse("cached:64:16:gc:mem").memory
    # The printed summary; the snapshot is written only into --snapshots (a 2B step's is too large to copy back).
    setting = bench.Setting.parse("cached:64:16:gc:mem")
    rows = bench.memory_summary({"device_traces": [trace]}, setting, argparse.Namespace(snapshots=None))
    out = capsys.readouterr().out
    assert rows[0] == ["vdr/models/biencoder.py:1 forward", 0.0, 1] and "0.00 GiB" in out and "(7 events)" in out
    assert "WARNING" not in out
    # A trace as long as the ring buffer may have lost its first events.
    monkeypatch.setattr(bench, "MEMORY_TRACE_EVENTS", len(trace))
    bench.memory_summary({"device_traces": [trace]}, setting, argparse.Namespace(snapshots=None))
    assert "WARNING: the trace is full" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    bench.memory_summary({"device_traces": [trace]}, setting, argparse.Namespace(snapshots=str(tmp_path / "snaps")))
    assert [p.name for p in (tmp_path / "snaps").iterdir()] == ["memory-cached_64_16_gc_mem.pickle"]


# The child of the test below: records each module that code under vdr/ or scripts/ imports itself, by distribution,
# while the benchmark runs one setting with every flag a GPU call uses (the CUDA-only parts are skipped on the CPU).
IMPORT_AUDIT = r"""
import importlib.metadata, json, re, runpy, sys
repo, allowed = sys.argv[1], set(json.loads(sys.argv[2]))
ours = (f"{repo}/vdr/", f"{repo}/scripts/")
owners = importlib.metadata.packages_distributions()
found = {}

class Audit:
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        frame = sys._getframe(1)
        while frame and (frame.f_code.co_filename.startswith("<frozen") or "importlib" in frame.f_code.co_filename):
            frame = frame.f_back
        where = frame.f_code.co_filename if frame else ""
        if where.startswith(ours) and top in owners:
            dists = {re.sub(r"[-_.]+", "-", d).lower() for d in owners[top]}
            if not dists & allowed:
                found.setdefault(top, where.removeprefix(repo + "/"))
        return None

sys.meta_path.insert(0, Audit())
sys.argv = ["batch_memory.py", *sys.argv[3:]]
try:
    runpy.run_path(f"{repo}/scripts/bench/batch_memory.py", run_name="__main__")
finally:
    print("AUDIT " + json.dumps(found))
"""


def test_the_gpu_benchmark_imports_only_what_the_gpu_machine_has_or_is_carried() -> None:
    """The lent GPU machine has no network: a direct import that is neither on its image (scripts/bench/gpu_image.txt)
    nor among the wheels prepare_gpu.sh carries fails there, after minutes of device time spent starting it."""
    def normal(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    image = [line.strip() for line in (REPO / "scripts/bench/gpu_image.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert {"torch", "transformers", "lightning", "peft"} <= {normal(n) for n in image}
    carried = re.search(r"^missing=\(([^)]*)\)", (REPO / "scripts/bench/prepare_gpu.sh").read_text(), re.M).group(1)
    allowed = {normal(n) for n in image + carried.split()} | {"vdr"}
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_AUDIT, str(REPO), json.dumps(sorted(allowed)), "--preset", "tiny", "--steps", "1",
         "--settings", "cached:8:4:t1400:gc:off:v4:r4:sparse:mem"],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    audit = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("AUDIT "))[6:])
    assert audit == {}, f"imported by vdr but neither on the GPU image nor carried (add to prepare_gpu.sh): {audit}"
