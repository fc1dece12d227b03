"""How the teacher's last hidden state is stored.

``fp32``/``fp16``/``bf16`` store it as is (bf16 as its raw 16 bits, Zarr has no bf16 type);
``none`` stores nothing. ``compact`` is a transform code built for what the hidden state is used
for, rebuilding teacher logits ``h @ W.T``:

- the error that matters is not ``|e|^2`` but the KL it causes, ``~ 1/2 e^T G e`` with ``G`` the
  covariance of the head rows under the teacher's distribution. So we whiten by ``G^(1/2)``
  (estimated on a calibration sample with the top-m tokens), decorrelate with the eigenbasis of
  the whitened covariance, and give each component an integer number of bits by greedy reverse
  water-filling (a bit goes where it removes the most distortion);
- each row is divided by its RMS gain (one fp16 scale, 2 bytes: the hidden states of LLMs have
  heavy-tailed tokens) and each component is quantised uniformly over its calibrated range; the
  default budget is 0.75 d bytes per token, scale included.

Naive per-row int8 fails on LLM hidden states because a few outlier channels set the row's
scale; the transform spreads those channels over all components and the allocation spends bits
where the head is sensitive. The codec's matrices are fitted once per cache and stored with it.
"""

from __future__ import annotations

import heapq
import math

import numpy as np
import torch

# Mean squared error of the Gaussian-optimal uniform quantiser with 2^b levels on N(0, 1) (Max, 1960):
# the distortion model of the bit allocation.
_MAX_MSE = {0: 1.0, 1: 0.3634, 2: 0.1188, 3: 0.03744, 4: 0.01154, 5: 0.003490, 6: 0.001035, 7: 0.0003, 8: 0.0000869}
MAX_BITS = 12


def _mse(bits: int) -> float:
    return _MAX_MSE[bits] if bits <= 8 else _MAX_MSE[8] * 4.0 ** (8 - bits)


class HiddenCodec:
    """Encodes fp32 hidden states [n, d] into named numpy arrays (with a leading token axis) and back."""

    name = "base"

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def array_specs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Array name -> (numpy dtype, per-token shape)."""
        raise NotImplementedError

    def encode(self, hidden: torch.Tensor) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decode(self, arrays: dict[str, np.ndarray]) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}


class PlainCodec(HiddenCodec):
    def __init__(self, dim: int, mode: str) -> None:
        super().__init__(dim)
        self.name = mode

    def array_specs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        dtype = {"fp32": "float32", "fp16": "float16", "bf16": "uint16"}[self.name]
        return {"hidden": (dtype, (self.dim,))}

    def encode(self, hidden: torch.Tensor) -> dict[str, np.ndarray]:
        h = hidden.detach().float().cpu()
        if self.name == "fp32":
            arr = h.numpy()
        elif self.name == "fp16":
            arr = h.half().numpy()
        else:
            arr = h.bfloat16().view(torch.int16).numpy().view(np.uint16)
        return {"hidden": np.ascontiguousarray(arr)}

    def decode(self, arrays: dict[str, np.ndarray]) -> torch.Tensor:
        arr = arrays["hidden"]
        if self.name == "bf16":
            return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16).float()
        return torch.from_numpy(np.asarray(arr, dtype=np.float32).copy())


class CompactCodec(HiddenCodec):
    """Sensitivity-weighted transform code with a per-row scale; see the module docstring."""

    name = "compact"

    def __init__(self, dim: int, encode_mat: torch.Tensor, decode_mat: torch.Tensor, mean: torch.Tensor,
                 std: torch.Tensor, clip: torch.Tensor, bits: torch.Tensor) -> None:
        super().__init__(dim)
        self.encode_mat = encode_mat.float()
        self.decode_mat = decode_mat.float()
        self.mean = mean.float()
        self.std = std.float()
        self.clip = clip.float()
        self.bits = bits.to(torch.int64)
        b = self.bits.numpy()
        self.total_bits = int(b.sum())
        self.nbytes = (self.total_bits + 7) // 8
        # component order used for packing: grouped by bit width
        self._groups = [(w, np.nonzero(b == w)[0]) for w in sorted(set(b.tolist())) if w > 0]
        self._levels = (2 ** self.bits).float()
        self._delta = torch.where(self.bits > 0, 2 * self.clip / self._levels, torch.zeros_like(self.clip))

    @classmethod
    def fit(cls, hidden: torch.Tensor, weight: torch.Tensor, top_idx: torch.Tensor, top_p: torch.Tensor,
            bytes_per_token: int | None = None) -> "CompactCodec":
        """Fit on calibration hidden states [N, d] and the teacher's top-m tokens/probabilities [N, m].

        ``bytes_per_token`` defaults to ``0.75 * d`` (2 of them hold the fp16 row scale).
        """
        h = hidden.double()
        d = h.shape[1]
        budget = int(bytes_per_token if bytes_per_token is not None else (3 * d) // 4)
        W = weight.double()
        # G = E_t[ sum_v p_v (w_v - mu_t)(w_v - mu_t)^T ] over the top-m tokens, accumulated in blocks.
        G = torch.zeros(d, d, dtype=torch.float64)
        for s in range(0, h.shape[0], 256):
            idx, p = top_idx[s:s + 256], top_p[s:s + 256].double()
            rows = W[idx]  # [b, m, d]
            mu = (p.unsqueeze(-1) * rows).sum(1, keepdim=True) / p.sum(-1, keepdim=True).unsqueeze(-1)
            x = ((rows - mu) * p.sqrt().unsqueeze(-1)).reshape(-1, d)
            G += x.T @ x
        G /= h.shape[0]
        g, Vg = torch.linalg.eigh(G)
        g = g.clamp_min(float(g.max()) * 1e-8)
        Hs = (Vg * g.sqrt()) @ Vg.T
        Hinv = (Vg / g.sqrt()) @ Vg.T
        mean = h.mean(0)
        z = (h - mean) @ Hs
        s, U = torch.linalg.eigh((z.T @ z) / max(1, z.shape[0] - 1))
        std = s.clamp_min(0).sqrt().clamp_min(1e-12)
        enc = Hs @ U
        y = ((h - mean) @ enc) / _row_scale(((h - mean) @ enc), std)
        clip = y.abs().amax(0).clamp_min(1e-12)
        bits = _allocate((std ** 2).numpy(), 8 * (budget - 2))
        return cls(d, enc.float(), (U.T @ Hinv).float(), mean.float(), std.float(), clip.float(),
                   torch.from_numpy(bits))

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "CompactCodec":
        return cls(int(state["mean"].shape[0]), state["encode_mat"], state["decode_mat"], state["mean"],
                   state["std"], state["clip"], state["bits"])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"encode_mat": self.encode_mat, "decode_mat": self.decode_mat, "mean": self.mean,
                "std": self.std, "clip": self.clip, "bits": self.bits}

    def array_specs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {"hidden_packed": ("uint8", (self.nbytes,)), "hidden_scale": ("float16", ())}

    def encode(self, hidden: torch.Tensor) -> dict[str, np.ndarray]:
        y = (hidden.float().cpu() - self.mean) @ self.encode_mat
        scale = _row_scale(y, self.std).half()
        y = y / scale.float()
        safe = torch.where(self._delta > 0, self._delta, torch.ones_like(self._delta))
        q = torch.floor(y / safe) + self._levels / 2
        q = torch.minimum(q.clamp_min(0), self._levels - 1).to(torch.int64).numpy()
        parts = []
        for w, cols in self._groups:
            vals = q[:, cols].astype(np.uint32)
            shifts = np.arange(w, dtype=np.uint32)
            parts.append(((vals[:, :, None] >> shifts) & 1).astype(np.uint8).reshape(len(q), -1))
        bitmat = np.concatenate(parts, axis=1) if parts else np.zeros((len(q), 0), np.uint8)
        return {"hidden_packed": np.packbits(bitmat, axis=1, bitorder="little"),
                "hidden_scale": scale.squeeze(-1).numpy()}

    def decode(self, arrays: dict[str, np.ndarray]) -> torch.Tensor:
        packed = arrays["hidden_packed"]
        n = packed.shape[0]
        bitmat = np.unpackbits(packed, axis=1, bitorder="little")[:, : self.total_bits]
        q = np.zeros((n, self.dim), dtype=np.int64)
        pos = 0
        for w, cols in self._groups:
            k = len(cols) * w
            block = bitmat[:, pos:pos + k].reshape(n, len(cols), w).astype(np.int64)
            q[:, cols] = (block << np.arange(w, dtype=np.int64)).sum(-1)
            pos += k
        y = (torch.from_numpy(q).float() - self._levels / 2 + 0.5) * self._delta
        scale = torch.from_numpy(np.asarray(arrays["hidden_scale"], dtype=np.float32)).reshape(n, 1)
        return (y * scale) @ self.decode_mat + self.mean


def _row_scale(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-row RMS of ``y`` in units of ``ref`` (the row's gain), floored away from zero."""
    return (y / ref).pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6).to(y.dtype)


def _allocate(variances: np.ndarray, total_bits: int) -> np.ndarray:
    """Greedy integer reverse water-filling: each bit goes where it removes the most distortion."""
    d = len(variances)
    bits = np.zeros(d, dtype=np.int64)
    heap = [(-(v * (_mse(0) - _mse(1))), i) for i, v in enumerate(variances)]
    heapq.heapify(heap)
    for _ in range(total_bits):
        if not heap:
            break
        gain, i = heapq.heappop(heap)
        if -gain <= 0:
            break
        bits[i] += 1
        if bits[i] < MAX_BITS:
            heapq.heappush(heap, (-(variances[i] * (_mse(int(bits[i])) - _mse(int(bits[i]) + 1))), i))
    return bits


def make_codec(mode: str, dim: int, state: dict[str, torch.Tensor] | None = None) -> HiddenCodec | None:
    """The codec for a storage mode (``None`` for ``none``); ``compact`` needs its fitted state."""
    if mode == "none":
        return None
    if mode == "compact":
        if state is None:
            raise ValueError("the compact codec needs its fitted state")
        return CompactCodec.from_state(state)
    return PlainCodec(dim, mode)


def bytes_per_token(codec: HiddenCodec | None) -> float:
    if codec is None:
        return 0.0
    return float(sum(np.dtype(dt).itemsize * math.prod(shape) for dt, shape in codec.array_specs().values()))

