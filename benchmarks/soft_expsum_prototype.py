"""Would the exponential sums serve a soft teacher? A PyTorch prototype of its loss, timed.

    python -m benchmarks.soft_expsum_prototype [--threads 2]

With a soft teacher, along the teacher's order (p before q: t_p > t_q), a = exp(2k (s - c_s)) and
b = exp(2k (t - c_t)), every untied pair has

    tanh(k (s_p - s_q)) tanh(k (t_p - t_q)) = (1 - 2 alpha)(1 - 2 beta),
    alpha = a_q / (a_p + a_q),  beta = b_q / (b_p + b_q)

so P tau = N - 2 sum alpha - 2 sum beta + 4 sum alpha beta. The first two sums are the hard-teacher
method's, O(C M). The last one, with both kernels expanded on the lattice,

    sum_{p before q} alpha beta = h^2 sum_{m,n} sum_q Fa_m,q Fb_n,q * sum_{p before q} Ea_m,p Eb_n,p

carries an M x N prefix matrix along the row: O(C M N). In blocks of L elements it is two matrix
products per block, (M x L)(L x N) (the block's terms against the prefix matrix, and the prefix
update), plus the L^2 / 2 pairs inside the block computed directly. This script does exactly that
for the loss (float64 and float32 products), checks it against the pair kernel, and times it
beside the pair kernel's soft-teacher forward (loss only) and forward + backward. The gradients
would need, by the same algebra, about four more products per block for the student and four for
the teacher (each is a sum over the other side of a bilinear form in the same expansions).
"""

from __future__ import annotations

import argparse
import time

import torch

from rkkd_kernels import expsum, kendall_loss


def node_terms(x: torch.Tensor, k: float, lat: expsum.Lattice, dtype):
    """E and F (M x C) of one row on its lattice, in float64, cast to `dtype` for the products."""
    centre = 0.5 * (x.max() + x.min())
    m_lo, m_hi = lat.node_range(k * float(x.max() - x.min()))
    t = torch.arange(m_lo, m_hi + 1, dtype=torch.float64) * lat.step
    y = torch.exp(t[:, None] + 2 * k * (x - centre)[None, :])
    e = torch.exp(-y)
    return e.to(dtype), (y * e).to(dtype)


def soft_loss_blocked(s: torch.Tensor, t: torch.Tensor, k: float, block: int, dtype) -> float:
    """The soft-teacher loss of one row (distinct teacher values) by the blocked expansion."""
    lat = expsum.LATTICES[torch.float32 if dtype == torch.float32 else torch.float64]
    c = s.shape[0]
    order = torch.argsort(t, descending=True, stable=True)
    s, t = s[order].double(), t[order].double()
    ea, fa = node_terms(s, k, lat, dtype)
    eb, fb = node_terms(t, k, lat, dtype)
    h = lat.step
    prefix = torch.zeros((ea.shape[0], eb.shape[0]), dtype=dtype)
    pref_ea = torch.zeros(ea.shape[0], dtype=torch.float64)
    pref_eb = torch.zeros(eb.shape[0], dtype=torch.float64)
    tau = 0.0
    for start in range(0, c, block):
        sl = slice(start, min(c, start + block))
        n = sl.stop - sl.start
        # Pairs inside the block, directly.
        ds = s[sl, None] - s[None, sl]
        dt = t[sl, None] - t[None, sl]
        tau += float(torch.triu(torch.tanh(k * ds) * torch.tanh(k * dt), 1).sum())
        # Pairs (p in earlier blocks, q in this one): N - 2 sum alpha - 2 sum beta + 4 sum alpha beta.
        before = start
        sum_alpha = h * float(fa[:, sl].double().sum(1) @ pref_ea)
        sum_beta = h * float(fb[:, sl].double().sum(1) @ pref_eb)
        sum_ab = h * h * float((torch.mm(fa[:, sl], fb[:, sl].T) * prefix).double().sum())
        tau += before * n - 2 * sum_alpha - 2 * sum_beta + 4 * sum_ab
        prefix += torch.mm(ea[:, sl], eb[:, sl].T)
        pref_ea += ea[:, sl].double().sum(1)
        pref_eb += eb[:, sl].double().sum(1)
    return 1.0 - tau / (c * (c - 1) / 2)


def best_time(fn, reps=3) -> float:
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return min(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    k = 1.0
    print("accuracy (loss, against the float64 pair kernel):")
    for c in (500, 3000):
        g = torch.Generator().manual_seed(c)
        s, t = torch.randn(c, generator=g, dtype=torch.float64), torch.randn(c, generator=g, dtype=torch.float64)
        s_close = t + 0.1 * torch.randn(c, generator=g, dtype=torch.float64)
        for name, ss in (("independent", s), ("student ~ teacher", s_close)):
            want = float(kendall_loss(ss[None], t[None], k, backend="cpu"))
            for dtype in (torch.float64, torch.float32):
                got = soft_loss_blocked(ss, t, k, args.block, dtype)
                print(f"  C={c:5d} {name:17s} products in {str(dtype):13s}: |error| = {abs(got - want):.1e}")
    print(f"time per row, {args.threads} threads (best of 3):")
    for c in (4096, 21841, 32000):
        g = torch.Generator().manual_seed(c)
        s, t = torch.randn(c, generator=g), torch.randn(c, generator=g)
        lat = expsum.LATTICES[torch.float32]
        m = lat.nodes(float(s.max() - s.min())), lat.nodes(float(t.max() - t.min()))
        t_proto = best_time(lambda: soft_loss_blocked(s, t, k, args.block, torch.float32))
        t_fwd = best_time(lambda: kendall_loss(s[None], t[None], k))
        sg = s[None].clone().requires_grad_(True)
        tg = t[None].clone().requires_grad_(True)
        t_both = best_time(lambda: kendall_loss(sg, tg, k).backward())
        macs = 2 * m[0] * m[1] * c
        print(f"  C={c:6d} M x N = {m[0]} x {m[1]}: prototype loss {t_proto * 1e3:8.1f} ms "
              f"({macs / 1e6:.0f} M multiply-adds in products); pair kernel loss {t_fwd * 1e3:8.1f} ms, "
              f"loss + both gradients {t_both * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
