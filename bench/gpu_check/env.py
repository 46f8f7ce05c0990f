"""Part env: the GPU, driver, CUDA, cuDNN, NCCL, torch, torchvision and DALI versions (DALI's: `not installed` where
it is not)."""
import os
import platform
import subprocess

import torch

from bench.gpu_check.context import CheckFailed, Context, Passed


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             check=False, capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"


def _dali_version() -> str:
    try:
        import nvidia.dali
    except ModuleNotFoundError:  # the device image's case: the runner skips the parts that need it
        return "not installed"
    return nvidia.dali.__version__


def check_env(ctx: Context) -> Passed:
    import torchvision

    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda, "torchvision": torchvision.__version__,
           "dali": _dali_version(), "cuda_available": torch.cuda.is_available(),
           "dali_threads": ctx.sizes.threads}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        nccl = torch.cuda.nccl.version()  # a tuple in current releases, an int in old ones
        env.update(gpu=props.name, gpu_count=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                   driver=_driver_version(), cudnn=torch.backends.cudnn.version(),
                   nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl))
    if ctx.mode == "gpu" and not torch.cuda.is_available():
        raise CheckFailed("no CUDA device is visible to torch; on a machine without a GPU run --cpu-smoke", **env)
    if "gpu" in env:
        return Passed(f"{env['gpu']}, driver {env['driver']}, torch {env['torch']}, DALI {env['dali']}", env)
    return Passed(f"no GPU; torch {env['torch']}, DALI {env['dali']}", env)
