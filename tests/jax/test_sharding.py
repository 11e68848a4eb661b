"""Sharded on 8 virtual CPU devices (4-way data x 2-way tensor parallel) equals one device.

Runs in a subprocess, because the virtual device count must be set before JAX starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # compiles the model for four meshes of eight virtual devices

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import bios
    from bios import types

    sys.path.insert(0, sys.argv[1])
    from helpers import random_batch, saved_weights

    def run(options):
        service = bios.ServiceClient(backend="jax", backend_options=options)
        client = service.create_lora_training_client("bios/tiny", rank=8, seed=2, train_unembed=True)
        losses = []
        for step in range(3):
            batch = random_batch(seed=step, size=5, length=13)
            losses.append(client.train(batch, learning_rate=1e-2, weight_decay=0.1).loss)
        forward = client.forward(random_batch(seed=9, size=3, length=30)).result()
        greedy_params = types.SamplingParams(max_tokens=6, temperature=0)
        greedy = client.sample(types.ModelInput.from_ints([0, 5, 6, 7]), greedy_params).result()
        weights = saved_weights(client.save_state("sharded-" + "-".join(options.values())).result().path)
        mesh = service.transport.backend.mesh
        return {"losses": losses, "logprobs": [o["logprobs"].data for o in forward.loss_fn_outputs],
                "greedy": greedy.sequences[0].tokens, "mesh": dict(mesh.shape),
                "weights": {k: v.tolist() for k, v in weights.items()}}

    print(json.dumps({"one": run({"devices": "1"}), "eight": run({"devices": "8", "model_parallel": "2"})}))
    """
)


def test_eight_virtual_devices_equal_one(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", BIOS_HOME=str(tmp_path))
    support = os.path.join(os.path.dirname(__file__), "..", "support")
    run = subprocess.run([sys.executable, "-c", SCRIPT, support], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    one, eight = result["one"], result["eight"]
    assert one["mesh"] == {"data": 1, "model": 1} and eight["mesh"] == {"data": 4, "model": 2}
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
    for a, b in zip(eight["logprobs"], one["logprobs"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert eight["greedy"] == one["greedy"]
    for name, value in one["weights"].items():
        expected, got = np.asarray(value), np.asarray(eight["weights"][name])
        assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected), name
