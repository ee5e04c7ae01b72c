"""The batch axis is sharded across devices: tested on CPU with four virtual devices.

XLA fixes the number of host devices when JAX starts, so this runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from conftest import tiny_spec, random_module
from pathlib import Path
from jaxdream.ascent import StaticSettings
from jaxdream.engine import Engine, ItemParams
from jaxdream.models import LoadedModel

spec = tiny_spec()
model = LoadedModel(spec, random_module(spec), Path("tiny.pth"), "0" * 64)
settings = StaticSettings(("block2",), octaves=2, steps=2)
rng = np.random.default_rng(0)
images = [rng.uniform(0, 255, shape + (3,)).astype(np.float32)
          for shape in [(40, 48), (36, 44), (48, 40), (40, 40), (33, 47), (44, 36)]]
params = [ItemParams(0.5 + 0.2 * i, 3, i, (1.0,)) for i in range(len(images))]
sharded = Engine(model, settings, batch_size=4)
together = sharded.render(images, params)
single = Engine(model, settings, batch_size=1, devices=jax.devices()[:1])
worst = max(float(np.abs(a - single.render([im], [p])[0]).max())
            for a, im, p in zip(together, images, params))
buffer, sample = sharded._stack(images[:4], params[:4], (64, 64))
placed, placed_params = sharded._place((buffer, sample))
out = sharded._program(placed, placed_params)(sharded._state, placed, placed_params)
spread = {len(placed.sharding.device_set), len(out.sharding.device_set)}
print(json.dumps({"devices": len(jax.devices()), "batch": sharded.batch_size, "spread": sorted(spread),
                  "programs": sharded.stats.programs, "worst": worst}))
"""


def test_batches_are_sharded_across_devices_and_match_one_device() -> None:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    tests = Path(__file__).resolve().parent
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tests)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4 and result["batch"] == 4
    assert result["spread"] == [4], "inputs and outputs live on all four devices"
    assert result["programs"] == 1  # one bucket (64 x 64), six images in two batches of four
    assert result["worst"] < 0.05, result  # float rounding only
