"""Peak host memory of `python -m train.export` on a model several shards large.

    PYTHONPATH=. python bench/export_memory.py [layers=2] [shard_mib=1024]

Builds the deepseek_v2_lite shape with fewer layers (2: one dense, one MoE layer of 64 experts; about 1.06B
parameters, 4.2 GB in fp32), saves it as a run's DCP checkpoint, then runs the export in a child process and
prints its peak RSS next to the output shard size and the RSS of a child that only imports the same modules.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from model import Transformer
from model.config import load_preset
from train.checkpoint import seal
from train.config import RunConfig, to_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402  (bench/, beside this file)

ROOT = Path(__file__).resolve().parent.parent


# runs `-m <module> <args>` (or, for "-", only imports the export's modules), then prints its own peak RSS
PEAK = """
import re, runpy, sys
sys.argv = sys.argv[1:]
if sys.argv[0] == "-":
    import train.hf.export
else:
    try:
        runpy.run_module(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        assert not e.code, e.code
print("VmHWM", re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
"""


def child_peak_mib(args: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of `python -m <args>` in a child; the peak is the child's own VmHWM (reset by
    exec, unlike ru_maxrss, which keeps the forking parent's pages)."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return int(proc.stdout.split("VmHWM")[-1]) / 1024, time.perf_counter() - t


def main(layers: int = 2, shard_mib: int = 1024) -> None:
    print(describe(), flush=True)
    cfg = load_preset("deepseek_v2_lite").replace(num_hidden_layers=layers)
    work = Path(tempfile.mkdtemp(prefix="export_bench_"))
    try:
        run = work / "run"
        ckpt = run / "checkpoints" / "step_00000001"
        model = Transformer(cfg)
        model.init_weights(seed=0)
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        biggest = max(p.numel() * p.element_size() for p in model.parameters())
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(ckpt))
        (ckpt / "train_state.json").write_text(json.dumps({"step": 1, "config": to_dict(RunConfig(model=cfg))}))
        seal(ckpt)  # the checksums a published checkpoint carries
        del model
        base, _ = child_peak_mib(["-"])
        peak, secs = child_peak_mib(["train.export", f"output_dir={run}", f"export.dir={work / 'hf'}",
                                     f"export.max_shard_bytes={shard_mib * 2**20}"])
        shards = len(list((work / "hf").glob("*.safetensors")))
        print(f"model {total / 2**20:.0f} MiB fp32 ({layers} layers; largest tensor {biggest / 2**20:.0f} MiB), "
              f"{shards} shards of <= {shard_mib} MiB, export {secs:.1f} s")
        print(f"peak RSS {peak:.0f} MiB; import-only child {base:.0f} MiB; above imports {peak - base:.0f} MiB "
              f"= {(peak - base) / shard_mib:.2f} shards = {(peak - base) * 2**20 / total:.2f} x the model")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    kw = dict(a.split("=") for a in sys.argv[1:])
    main(**{k: int(v) for k, v in kw.items()})
