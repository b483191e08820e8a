"""Run code in a fresh Python where `multimodal_moe` is NOT importable, as on a Hub user's machine."""

import json
import os
import subprocess
import sys
import textwrap

# Installed in the child before anything else: any import of multimodal_moe fails, like on a machine without it.
_BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "multimodal_moe" or name.startswith("multimodal_moe."):
            raise ImportError("multimodal_moe is blocked in this process (Hub-user simulation)")
        return None
sys.meta_path.insert(0, _Block())
"""


def run_without_package(code: str, *, cwd, timeout: int = 600) -> dict:
    """Run `code` in a subprocess without multimodal_moe; the code must `print(json.dumps(result))` as its last line.

    Returns that JSON. HF_HUB_OFFLINE keeps transformers from reaching the Hub; HF_MODULES_CACHE is private to `cwd`
    so remote code is copied fresh from the checkpoint.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(cwd / "hf_modules"), PYTHONPATH="")
    script = _BLOCKER + "\n" + textwrap.dedent(code)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
