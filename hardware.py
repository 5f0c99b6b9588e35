"""Where a run computes: seeds, the device, the precision (`--dtype auto`), and several
processes started by torchrun."""
import contextlib
import dataclasses
import os
import random
import resource
import sys

import numpy as np
import torch


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_bfloat16_kernels():
    # oneDNN has bf16 convolution kernels only for CPUs with AVX-512 or newer; elsewhere bf16
    # falls back to a reference path, many times slower than float32 (RESULTS.md).
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without the probe: assume the fast path
        return True


def bfloat16_is_fast(device):
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bfloat16_kernels()


def resolve_dtype(name, device, say=print):
    """--dtype auto -> bfloat16 where the device has fast bf16 kernels (CUDA GPUs that support
    it, CPUs with AVX-512 BF16), float32 elsewhere; says which it picked. Other names pass."""
    if name != "auto":
        return name
    dtype = "bfloat16" if bfloat16_is_fast(device) else "float32"
    where = "this GPU" if device.type == "cuda" else "this CPU"
    has = "has" if dtype == "bfloat16" else "has no"
    say(f"precision: {dtype} (--dtype auto: {where} {has} fast bf16 kernels)")
    return dtype


def use_fast_math(device, dtype="float32"):
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    if dtype == "bfloat16" and device.type == "cpu" and not cpu_has_bfloat16_kernels():
        print("warning: this CPU has no bf16 convolution kernels (they need AVX-512); --dtype bfloat16 "
              "runs many times slower than float32 here", file=sys.stderr)



def peak_memory_gb():
    """The most resident memory this process has held so far, in GB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)



@dataclasses.dataclass
class Ranks:
    """This process's place among the processes torchrun started (one process: rank 0 of 1)."""
    rank: int = 0
    world: int = 1
    started_group: bool = False

    @property
    def main(self):
        return self.rank == 0

    def sum(self, tensor):
        """All-reduce in place (sum over processes); returns the tensor."""
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def any(self, flag, device):
        if self.world == 1:
            return flag
        return bool(self.sum(torch.tensor(float(flag), device=device)) > 0)

    def wait_for_all(self):
        """A barrier: the main process saves after the last collective, and a process that left
        the group while another still worked could abort at exit."""
        if self.started_group:
            torch.distributed.barrier()

    def close(self):
        if self.started_group:
            torch.distributed.destroy_process_group()


def join_processes(device_name):
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, one GPU per
    process, and gloo on CPUs. Returns (Ranks, device); a plain run needs none of it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return Ranks(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    started = not torch.distributed.is_initialized()
    if started:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(rank, world, started), device


@contextlib.contextmanager
def process_group(device_name):
    """join_processes for the length of a run; leaves the group it joined afterwards."""
    ranks, device = join_processes(device_name)
    try:
        yield ranks, device
        ranks.wait_for_all()  # after a run that ended normally only: a failed process never arrives
    finally:
        ranks.close()


def wrap_for_ranks(model, ranks, device):
    """DistributedDataParallel over several processes. Buffers are not broadcast: the
    quantizer keeps its own in step by all-reducing its statistics."""
    if ranks.world == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def print_on_main(ranks):
    return print if ranks.main else (lambda *args, **kwargs: None)


