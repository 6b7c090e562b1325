"""A small end-to-end demo: a 2-layer NSA language model learns a long-range copy task.

Each sequence is random tokens followed by an exact copy, so the second half is
predictable only by looking back ``seq_len/2`` tokens, far outside the sliding
window. Runs the Triton kernels on a GPU and the reference on a CPU.

    python -m nsa_parallel.demo --steps 150
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from . import NativeSparseAttention, NSAConfig


class TinyNSAModel(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, config: NSAConfig):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict({
                "norm1": nn.LayerNorm(hidden),
                "attn": NativeSparseAttention(hidden, heads, kv_heads, head_dim, config=config),
                "norm2": nn.LayerNorm(hidden),
                "mlp": nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden)),
            }))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + block["attn"](block["norm1"](x))
            x = x + block["mlp"](block["norm2"](x))
        return self.head(self.norm(x))


def copy_batch(batch: int, seq_len: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    half = torch.randint(0, vocab, (batch, seq_len // 2), generator=generator)
    return torch.cat([half, half], dim=1)


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seq-len", type=int, default=None, help="default: 4096 on GPU, 256 on CPU")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seq_len = args.seq_len or (4096 if device.type == "cuda" else 256)
    config = NSAConfig(compress_block_size=16, compress_stride=8, select_block_size=32, num_selected_blocks=4,
                       window_size=32)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    vocab = 32
    model = TinyNSAModel(vocab, hidden=128, layers=2, heads=8, kv_heads=2, head_dim=32, config=config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    print(f"NSA demo on {device}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"seq_len {seq_len}, batch {args.batch}, {config}")

    first_loss, loss_value, start = None, float("nan"), time.perf_counter()
    for step in range(1, args.steps + 1):
        tokens = copy_batch(args.batch, seq_len, vocab, generator).to(device)
        with autocast:
            logits = model(tokens[:, :-1])
        # Only the copied half is predictable.
        half = seq_len // 2
        loss = nn.functional.cross_entropy(logits[:, half - 1:].float().reshape(-1, vocab), tokens[:, half:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        first_loss = loss_value if first_loss is None else first_loss
        if step % 10 == 0 or step == 1 or step == args.steps:
            rate = step * args.batch * seq_len / (time.perf_counter() - start)
            print(f"step {step:4d}/{args.steps}  loss {loss_value:.3f}  (chance {torch.log(torch.tensor(vocab)).item():.3f})"
                  f"  {rate:,.0f} tokens/s", flush=True)
    print(f"done: loss on the copied half fell from {first_loss:.3f} to {loss_value:.3f} in {args.steps} steps "
          f"({time.perf_counter() - start:.0f} s)")
    return loss_value


if __name__ == "__main__":
    main()
