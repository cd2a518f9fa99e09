"""An eighth PEFT method, defined in this folder (extra_method/scaled_method.py) and installed as another
package's would be (a `muxtune.peft_methods` entry point), runs through profile, plan, simulate and train
without a line of the project naming it: everything MuxTune needs to know of it is in its module."""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "extra_method"


def install_entry_point(site: Path) -> None:
    """A distribution's metadata on sys.path, as pip would leave it: importlib.metadata finds its entry point."""
    info = site / "scaled_method-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: scaled-method\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[muxtune.peft_methods]\nscaled = scaled_method\n")


def test_a_method_from_another_package_is_profiled_planned_simulated_and_trained(tmp_path):
    site = tmp_path / "site"
    install_entry_point(site)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(HERE)]), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-P", str(HERE / "drive.py"), str(tmp_path)], env=env, text=True,
                          capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["profiled"] == ["lora", "scaled"]  # the profiler measured it from its card's probe
    assert out["priced_step_s"] > 0
    assert out["plan_tasks"] == ["gain", "lora"] and out["predicted_step_s"] > 0
    assert all(row["adapters"] > 0 for row in out["predicted_memory"])
    gain, lora = out["tasks"]["gain"], out["tasks"]["lora"]
    assert gain["method"] == "scaled" and gain["status"] == "finished" and gain["steps"] == 6
    assert lora["status"] == "finished"
    # its card's parameter formula counts what the executor built: q_proj (hidden) + v_proj (kv width) per layer
    assert gain["trainable_params"] == out["estimated_params"]
    assert out["largest_gain"] > 0  # the gains start at 0: they trained, and were exported
    assert "adapter_config.json" in out["adapter_files"]


def test_the_entry_point_is_needed():
    """Without the entry point the method is unknown, with a clear message (nothing registers it by accident)."""
    from muxtune.errors import MuxTuneError
    from muxtune.spec import method_card

    try:
        method_card("scaled")
    except MuxTuneError as exc:
        assert "unknown method 'scaled'" in str(exc)
    else:
        raise AssertionError("'scaled' was found without its entry point")
