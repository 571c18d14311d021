"""Peak-memory measurement for the benchmarks.

``peak_memory(run, device)``: the memory ``run()`` needs beyond what is held before it, after the
caller's warm-up (so optimizer state and lazy initialisation are not counted).

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` before the call.
* CPU: PyTorch has no CPU allocator statistics and tracemalloc does not see its allocations, so we
  read the kernel's resident-set high-water mark (VmHWM in /proc/self/status): freed heap is
  returned to the OS (malloc_trim), the high-water mark reset (writing 5 to /proc/self/clear_refs),
  and the result is VmHWM after ``run()`` minus VmRSS before it. Where resetting is not allowed, the
  process's VmHWM is used (an upper bound; marked in the result).

Because the high-water mark belongs to the whole process, every CPU measurement runs in its own
process: ``isolated(target, tasks)`` starts one clean helper (``python -m bench.memory``) that imports
the target's module and forks one child per task; the child calls ``target(task)`` and sends back
its dict.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import subprocess
import sys
from typing import Callable

import torch


def error_text(exc: BaseException) -> str:
    """One line naming the exception, short enough for a table cell."""
    return f"{type(exc).__name__}: {exc}".split("\n")[0][:300]


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> bool:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_memory(run: Callable[[], object], device: str) -> dict:
    """Peak memory of ``run()`` beyond what is held before it (see the module docstring).
    Returns ``peak_mem_mb``, ``peak_total_mb`` and ``mem_method``."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mem_mb": (peak - held) / 2**20, "peak_total_mb": peak / 2**20,
                "mem_method": "torch.cuda.max_memory_allocated"}
    was_reset = _reset_cpu_peak()
    held_kb = _proc_status_kb("VmRSS")
    run()
    peak_kb = _proc_status_kb("VmHWM")
    return {"peak_mem_mb": (peak_kb - held_kb) / 1024, "peak_total_mb": peak_kb / 1024,
            "mem_method": "VmHWM-VmRSS (forked process)" + ("" if was_reset else ", HWM since fork")}


def _resolve(target: str) -> Callable[[dict], dict]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _forked(function: Callable[[dict], dict], task: dict) -> dict:
    """Run ``function(task)`` in a forked child; its JSON result comes back through a pipe."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into the helper's code
        os.close(read_fd)
        try:
            torch.set_num_threads(task.get("threads", 1))
            result = function(task)
        except BaseException as exc:
            result = {"error": error_text(exc)}
        os.write(write_fd, json.dumps(result).encode())
        os._exit(0)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return {"error": f"memory child exited with status {status} and no result"}
    return json.loads(b"".join(chunks))


def serve(request: dict, emit: Callable[[str], object]) -> None:
    """The helper's work: import the modules in ``request["preload"]`` and ``request["target"]``
    ("module:function"), then one forked child per task in ``request["tasks"]``; each result is
    emitted as a ``RESULT <json>`` line."""
    for module in request.get("preload", ()):  # imported before forking: children do not pay for it
        importlib.import_module(module)
    function = _resolve(request["target"])
    gc.collect()
    gc.freeze()  # the children's gc.collect() then skips the objects created at import
    try:
        for task in request["tasks"]:
            emit("RESULT " + json.dumps(_forked(function, task)))
    finally:
        # Objects left in the permanent generation are never freed at exit; nanobind (Triton's
        # bindings) then reports each of its objects as leaked.
        gc.unfreeze()


def isolated(target: str, tasks: list[dict], preload=(), progress=None) -> list[dict]:
    """``target(task)`` for every task, each in its own process forked from one clean helper.

    The helper (``python -m bench.memory``) has imported torch, the ``preload`` modules and the
    target's module but run nothing, so forking it is safe (no OpenMP pool yet) and every child starts from the same state."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, "-m", "bench.memory"], cwd=root, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    proc.stdin.write(json.dumps({"target": target, "tasks": tasks, "preload": list(preload)}) + "\n")
    proc.stdin.close()
    results = []
    for line in proc.stdout:
        if line.startswith("RESULT "):
            results.append(json.loads(line[len("RESULT "):]))
            if progress is not None:
                progress.update(1)
    proc.wait()
    while len(results) < len(tasks):
        results.append({"error": f"memory helper exited with status {proc.returncode}"})
    return results


if __name__ == "__main__":
    serve(json.loads(sys.stdin.readline()), lambda line: print(line, flush=True))
