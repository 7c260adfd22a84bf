"""Peak memory of this process: resident set (Linux /proc) and CUDA allocations, for runs and benchmarks."""

from pathlib import Path

import torch


def _status_kib(key: str) -> int | None:
    """A KiB field of /proc/self/status (VmRSS: now, VmHWM: the peak); None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss():
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux; elsewhere a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_gb() -> float | None:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib / 2**20


def memory_mb(device: torch.device, peak: bool = False) -> tuple[float, str]:
    """(MiB, kind). CUDA: max_memory_allocated (or allocated now); CPU: peak RSS (VmHWM) or RSS now (VmRSS)."""
    if device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)
        return allocated / 2**20, "CUDA"
    kib = _status_kib("VmHWM" if peak else "VmRSS")
    return (float("nan") if kib is None else kib / 1024), "RSS"
