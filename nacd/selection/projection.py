"""Seeded random projection of gradient vectors (Johnson-Lindenstrauss), never materialised whole.

A LoRA gradient of a 7B model has ~10^7 entries; an 8192-column projection matrix of it would be
hundreds of GB. The matrix is instead generated in row blocks from (seed, block index), so any
block can be regenerated identically (on the same device type), and gradients are projected block
by block: ``x @ R = sum_b x[:, rows_b] @ R[rows_b]``. Blocks are kept in memory only while they fit
``cache_bytes``; otherwise each ``project`` call regenerates them, which is why callers project
gradients in batches. Entries are +-1/sqrt(k) (Rademacher, as LESS/TRAK) or N(0, 1/k), so
``E[<Rx, Ry>] = <x, y>`` and inner products are preserved up to O(1/sqrt(k)).
"""
from __future__ import annotations

import math

import torch

BLOCK_BYTES = 32 * 2**20  # one generated block; fixed so the matrix depends on (seed, dims) only


class RandomProjector:
    def __init__(self, dim_in: int, dim_out: int, *, seed: int = 0, kind: str = "rademacher",
                 cache_bytes: int = 512 * 2**20, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        if dim_in <= 0 or dim_out <= 0:
            raise ValueError(f"projection dims must be positive (got {dim_in} -> {dim_out})")
        if kind not in ("rademacher", "gaussian"):
            raise ValueError(f"unknown projection type {kind!r} (rademacher or gaussian)")
        self.dim_in, self.dim_out, self.seed, self.kind, self.dtype = dim_in, dim_out, seed, kind, dtype
        self.device = torch.device(device)
        # Rows per block depend on dim_out only, never on memory settings: same seed, same matrix.
        self.block_rows = max(1, BLOCK_BYTES // (4 * dim_out))
        self._cache: dict[int, torch.Tensor] | None = (
            {} if dim_in * dim_out * 4 <= cache_bytes else None)

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.dim_in / self.block_rows)

    def block(self, b: int) -> torch.Tensor:
        """Rows ``[b * block_rows, (b + 1) * block_rows)`` of the (dim_in x dim_out) matrix."""
        if self._cache is not None and b in self._cache:
            return self._cache[b]
        rows = min(self.block_rows, self.dim_in - b * self.block_rows)
        # One generator per block, seeded from (seed, b): blocks are independent of call order.
        # It runs on the projection's device: a GPU draws a block thousands of times faster than a
        # CPU, and an uncached matrix (8192 columns of a LoRA gradient: 15 GB) is redrawn on every
        # call. The draws differ between CPU and CUDA, so the matrix is fixed per device type.
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + b)
        shape = (rows, self.dim_out)
        if self.kind == "rademacher":
            r = torch.randint(0, 2, shape, generator=gen, device=self.device).to(self.dtype).mul_(2).sub_(1)
        else:
            r = torch.randn(shape, generator=gen, dtype=self.dtype, device=self.device)
        r = r.div_(math.sqrt(self.dim_out))
        if self._cache is not None:
            self._cache[b] = r
        return r

    def matrix(self) -> torch.Tensor:
        """The whole matrix (tests and small problems only)."""
        return torch.cat([self.block(b) for b in range(self.num_blocks)])

    @torch.no_grad()
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(n, dim_in) -> (n, dim_out)."""
        if x.dim() != 2 or x.shape[1] != self.dim_in:
            raise ValueError(f"expected (n, {self.dim_in}) gradients, got {tuple(x.shape)}")
        x = x.to(device=self.device, dtype=self.dtype)
        out = torch.zeros(x.shape[0], self.dim_out, dtype=self.dtype, device=self.device)
        for b in range(self.num_blocks):
            start = b * self.block_rows
            out.addmm_(x[:, start:start + self.block_rows], self.block(b))
        return out
