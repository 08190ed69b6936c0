"""scripts/bench/batch_memory.py: its settings parse into the options the module runs with (the GPU calls are
prepared as command lines; a typo there costs device time)."""

from __future__ import annotations

import argparse
import importlib.util
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


def test_the_peak_composition_replays_the_allocation_trace(bench) -> None:
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
