"""torch's attention on a GPU: what a shape costs the first time it is seen, per backend (benchmarks/README, "One GPU").

    python -m benchmarks.gpu_attention

Forward + backward of `scaled_dot_product_attention` in bf16 at the small model's heads (8 x 64), one sequence
of each of 8 lengths that the process has not seen before (as an RL step's or a padding-free batch's shapes are),
then the same 8 again: causal without a mask (flash's case), and with the 4-D block-causal mask of a packed row
(two samples). Each backend gets lengths of its own, so no backend finds a shape another one has planned.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, HEAD_DIM = 8, 64
BACKENDS = {"torch's order": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
NAMES = {int(value): name for name, value in SDPBackend.__members__.items()}


def block_causal(length: int) -> torch.Tensor:
    """[1, 1, L, L] bool: causal within each half of the row, nothing across (two packed samples)."""
    half = length // 2
    owner = (torch.arange(length, device="cuda") >= half).long()
    causal = torch.ones(length, length, dtype=torch.bool, device="cuda").tril()
    return (causal & (owner[:, None] == owner[None, :]))[None, None]


def seconds(length: int, masked: bool) -> float:
    """One forward + backward at a fresh [1, heads, length, head_dim], synchronised."""
    q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    mask = block_causal(length) if masked else None
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not masked)
    out.float().square().sum().backward()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}; "
          f"SDPA priority order {[NAMES[b] for b in torch._C._get_sdp_priority_order()]}, "
          f"cuDNN SDPA enabled: {torch.backends.cuda.cudnn_sdp_enabled()}", flush=True)
    seconds(96, False)  # CUDA context, cuBLAS and the allocator: nothing of it belongs to a backend
    print(f"{'backend':>14} {'mask':>12} {'new shape ms (median, max)':>28} {'seen shape ms (median)':>24}")
    offset = 0
    for name, backend in BACKENDS.items():
        for masked in (False, True):
            offset += 1
            lengths = [100 + 64 * i + offset for i in range(8)]  # distinct from every other row's
            context = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
            try:
                with context:
                    first = [seconds(length, masked) for length in lengths]
                    again = [seconds(length, masked) for length in lengths]
            except RuntimeError as error:
                print(f"{name:>14} {'block-causal' if masked else 'causal':>12}  unavailable: "
                      f"{str(error).splitlines()[0][:80]}")
                continue
            print(f"{name:>14} {'block-causal' if masked else 'causal':>12} "
                  f"{1e3 * statistics.median(first):>17.2f} {1e3 * max(first):>10.2f} "
                  f"{1e3 * statistics.median(again):>24.2f}", flush=True)


if __name__ == "__main__":
    main()
