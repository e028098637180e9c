"""A vLLM whose internals moved, simulated in this (fresh) process: one touch point's check
reports a move before vLLM loads the plugin. Then the runs given, each recorded as its result
or its error (type and message).

    python -m tests.vllm.moved_touch_point TOUCH_POINT_NAME '<json list of run_engine kwargs>' OUT.json
"""

import dataclasses
import json
import sys


def simulate_moved(name: str) -> None:
    from mla_plugin.vllm import touch_points

    found = [p for p in touch_points.TOUCH_POINTS if p.name == name]
    assert len(found) == 1, f"no touch point named {name!r}"
    moved = dataclasses.replace(found[0], check=lambda obj: ["moved (simulated by the test)"])
    touch_points.TOUCH_POINTS = tuple(moved if p is found[0] else p for p in touch_points.TOUCH_POINTS)


def main(name: str, runs: list[dict], out_path: str) -> None:
    simulate_moved(name)
    from tests.vllm.engines import run_engine

    results = []
    for kwargs in runs:
        print(f"=== engine run {len(results)}: {json.dumps(kwargs)}", flush=True)
        try:
            results.append({"result": run_engine(**kwargs)})
        except Exception as exc:  # noqa: BLE001 - the refusals are what is recorded
            results.append({"error": type(exc).__name__, "message": str(exc)})
    deepseek_v2 = sys.modules.get("vllm.model_executor.models.deepseek_v2")
    hooked = deepseek_v2 is not None and "_mla_plugin_original" in vars(deepseek_v2.DeepseekV2MLAAttention)
    with open(out_path, "w") as f:
        json.dump({"runs": results, "deepseek_hooked": hooked}, f)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3])
