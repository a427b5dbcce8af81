"""The device check (extras/gpu_check.py) runs every stage on the CPU at tiny shapes, so that it works the first time
it meets a GPU."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_device_check_runs_every_stage_on_the_cpu(tmp_path):
    """extras/gpu_check.py --cpu-smoke: every stage of the device check at tiny shapes, so that it works the first
    time it meets a GPU (its pytest stage is the suite itself, so the smoke test leaves it out)."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), GC_WORK=str(tmp_path / "work"), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, os.path.join(ROOT, "extras", "gpu_check.py"), "--cpu-smoke"], env=env,
                   capture_output=True, text=True, timeout=300)
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert status == dict.fromkeys(["env", "train", "resume", "shapes", "generate", "decode"], "PASS"), summary
    facts = {s["stage"]: s["facts"] for s in summary["stages"]}
    assert facts["resume"]["resumed"]["bit_exact"] and facts["generate"]["cached_equals_no_cache"]
    assert all(facts["decode"]["same_tokens"].values())
