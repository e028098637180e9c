"""Import every vLLM model module, in this (fresh) process, with or without mla_plugin registered.

    python -m tests.vllm.import_all_models with|without OUT.json

"with": vLLM's own plugin loader runs the ``vllm.general_plugins`` entry points (ours:
registration.register, which installs the DeepSeek-V2 hook) before the first import.
"without": VLLM_PLUGINS names no installed plugin, so none loads. Writes
``{"errors": {module: "Type: message" | null}, "hooked": bool, "plugins": [...]}``.
"""

import importlib
import json
import os
import pkgutil
import sys
import traceback

# vLLM's model packages: the executor's registry modules and the newer per-family ones (dots3_note, ...).
PACKAGES = ("vllm.model_executor.models", "vllm.models")


def module_names() -> list[str]:
    names = []
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        names.append(package_name)
        for info in pkgutil.walk_packages(package.__path__, prefix=package_name + ".",
                                          onerror=lambda name: names.append(name)):
            names.append(info.name)
    return sorted(set(names))


def import_all() -> dict:
    errors = {}
    for name in module_names():
        try:
            importlib.import_module(name)
            errors[name] = None
        except BaseException as exc:  # noqa: BLE001 - a module may even call sys.exit
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            errors[name] = last[:500]
    return errors


def main(mode: str, out_path: str) -> None:
    if mode == "without":
        os.environ["VLLM_PLUGINS"] = "no_plugin_of_this_name"
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    from vllm.plugins import load_plugins_by_group

    plugins = sorted(load_plugins_by_group("vllm.general_plugins")) if mode == "with" else []
    errors = import_all()
    deepseek_v2 = sys.modules.get("vllm.model_executor.models.deepseek_v2")
    hooked = deepseek_v2 is not None and "_mla_plugin_original" in vars(deepseek_v2.DeepseekV2MLAAttention)
    with open(out_path, "w") as f:
        json.dump({"errors": errors, "hooked": hooked, "plugins": plugins}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
