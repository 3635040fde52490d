"""Peak RSS growth of one training step, in a fresh Python subprocess per method (CPU, Linux)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, Optional

import torch

from ._memory_step import build_local, random_batch, run_method_step
from .errors import AugLocalError
from .local import LocalNet
from .options import ConversionOptions

__all__ = ["rss_source", "rss_in_subprocess"]


def rss_source(model_or_spec, local) -> Optional[Dict[str, Any]]:
    if isinstance(model_or_spec, str):
        return {"spec": model_or_spec}
    target = model_or_spec
    if isinstance(model_or_spec, LocalNet):
        if local.spec:
            return {"spec": local.spec, "options": local.conversion.to_dict()}
        target = local
    fd, path = tempfile.mkstemp(suffix=".pt", prefix="auglocal-mem-")
    os.close(fd)
    try:
        torch.save(target, path)
    except Exception:  # noqa: BLE001 - anything unpicklable: local classes, lambdas, ...
        os.unlink(path)
        return None
    return {"path": path, "tmp": True, "is_local": isinstance(model_or_spec, LocalNet)}


def rss_in_subprocess(source: Dict[str, Any], method: str, d: int, batch_size: int,
                       kwargs: Dict[str, Any], seed: int, mmap_threshold: Optional[int] = None,
                       aux_checkpoint: bool = False, step_each_module: bool = False) -> Optional[int]:
    payload = {"source": {k: v for k, v in source.items() if k != "tmp"}, "method": method, "d": d,
               "batch_size": batch_size, "kwargs": _jsonable(kwargs), "seed": seed,
               "options": kwargs["options"].to_dict() if "options" in kwargs else None,
               "aux_checkpoint": aux_checkpoint, "step_each_module": step_each_module}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(int(mmap_threshold))
    code = "from auglocal_fx._memory_rss import _rss_main; _rss_main()"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(payload)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise AugLocalError(f"RSS measurement subprocess for {method} failed ({last}); rerun with rss=False")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["rss_peak"])


def _jsonable(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for k, v in kwargs.items():
        try:
            json.dumps(v)
        except TypeError:
            continue  # leaf_modules given as classes etc. travel only with a pickled model
        out[k] = v
    return out


def _read_status(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise AugLocalError(f"/proc/self/status has no {field_name}; RSS can only be measured on Linux")


def _rss_main() -> None:
    """Subprocess entry point: one step of one method, prints the RSS growth as JSON."""
    payload = json.loads(sys.argv[-1])
    source, kwargs = payload["source"], payload["kwargs"]
    if "input_size" in kwargs:
        kwargs["input_size"] = tuple(kwargs["input_size"])
    options = source.get("options") or payload.get("options")
    if options is not None:
        kwargs["options"] = ConversionOptions.from_dict(options)
    if "spec" in source:
        model_or_spec = source["spec"]
    else:
        model_or_spec = torch.load(source["path"], weights_only=False)
    local = build_local(model_or_spec, payload["d"], kwargs)
    local.aux_checkpoint = bool(payload.get("aux_checkpoint", False))
    local.train()
    run_method_step(local, payload["method"], *random_batch(local, 2, torch.device("cpu"), payload["seed"]))
    x, y = random_batch(local, payload["batch_size"], torch.device("cpu"), payload["seed"])
    gc.collect()
    before = _read_status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        before = _read_status("VmHWM")  # cannot reset: growth of the high-water mark instead
    run_method_step(local, payload["method"], x, y, bool(payload.get("step_each_module", False)))
    peak = _read_status("VmHWM")
    print(json.dumps({"rss_peak": max(0, peak - before)}))
