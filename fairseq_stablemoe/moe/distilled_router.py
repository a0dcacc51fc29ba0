"""Distilled routers (paper §3.1, Eqs. 9-10): a light model of the token ids that learns to
predict the backbone's routing in stage 1 and alone routes, frozen, in stage 2.

Every router maps token ids (B x S, the whole prefix) to features ĥ (B x S x D); the scores are
ŝ = ĥ·Êᵀ. Routers see the whole prefix so that incremental decoding (where the decoder only
feeds the newest position) routes exactly like a full-sequence forward.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class DistilledRouter(nn.Module):
    def __init__(self, vocab_size: int, num_experts: int, dim: int, padding_idx: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.padding_idx = padding_idx
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=padding_idx)  # D, N(0, 1) init
        nn.init.normal_(self.embed.weight)
        self.embed.weight.data[padding_idx].zero_()
        self.centroids = nn.Parameter(torch.empty(num_experts, dim))  # Ê
        nn.init.orthogonal_(self.centroids, gain=0.1)

    @property
    def frozen(self) -> bool:
        return not self.centroids.requires_grad

    def freeze(self):
        for p in self.parameters():
            p.requires_grad_(False)

    def fix_routing(self):
        """Stage 2 begins: the routing of every token is final (a router that can, tabulates it here)."""

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens)

    def forward(self, tokens: torch.Tensor, last: int) -> torch.Tensor:
        """ŝ (B x last x N) for the `last` newest positions of `tokens` (B x S), in at least float32 under any
        autocast (float64 in a float64 model)."""
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            dtype = torch.promote_types(self.centroids.dtype, torch.float32)
            return F.linear(self.features(tokens)[:, -last:].to(dtype), self.centroids.to(dtype))

    @torch.no_grad()
    def route(self, tokens: torch.Tensor, last: int, fixed: bool = False) -> torch.Tensor:
        """â = argmax_i ŝ_i (Eq. 13), B x last. `fixed` (the StableMoE routing is in stage 2): as fix_routing fixed
        it when stage 2 began; a router without a table gets the same from its frozen weights."""
        return self(tokens, last).argmax(-1)


class WordEmbeddingRouter(DistilledRouter):
    """ĥ_t = D(x_t): routing depends on the token id alone, so once frozen it is a table."""

    def __init__(self, vocab_size, num_experts, dim, padding_idx):
        super().__init__(vocab_size, num_experts, dim, padding_idx)
        # token id -> expert, filled when stage 2 begins (-1 before), saved for inference. An integer buffer:
        # converting the model to fp16/bf16 cannot move a token to another expert
        self.register_buffer("table", torch.full((vocab_size,), -1, dtype=torch.long))

    def fix_routing(self):
        with torch.no_grad():
            ids = torch.arange(self.vocab_size, device=self.table.device)
            self.table.copy_(self(ids.unsqueeze(0), self.vocab_size).argmax(-1).squeeze(0))

    @torch.no_grad()
    def route(self, tokens, last, fixed=False):
        if fixed:  # end_stage1 built it; every checkpoint written in stage 2 (by any version) holds it
            return self.table[tokens[:, -last:]]
        return super().route(tokens, last)


class CNNRouter(DistilledRouter):
    """ĥ_t = Σ_{k<5} w_k · D(x_{t-k}): a causal width-5 convolution with one scalar per offset."""

    width = 5

    def __init__(self, vocab_size, num_experts, dim, padding_idx):
        super().__init__(vocab_size, num_experts, dim, padding_idx)
        self.kernel = nn.Parameter(torch.empty(self.width).uniform_(-0.447, 0.447))

    def features(self, tokens):
        e = self.embed(tokens)  # B x S x D
        b, s, d = e.shape
        x = F.pad(e.transpose(1, 2).reshape(b * d, 1, s), (self.width - 1, 0))
        # conv1d correlates: weight[j] meets position t - (width-1-j), hence the flip
        y = F.conv1d(x, self.kernel.flip(0).view(1, 1, -1).to(x.dtype))
        return y.view(b, d, s).transpose(1, 2)


class BigramRouter(DistilledRouter):
    """ĥ_t = (D(x_t) + D(x_{t-1})) / 2, with a zero vector before the first token."""

    def features(self, tokens):
        e = self.embed(tokens)
        return (e + F.pad(e, (0, 0, 1, 0))[:, :-1]) / 2


class _CausalBlock(nn.Module):
    """A pre-LN Transformer block (GPT-Neo's order: x + Att(LN(x)), then x + MLP(LN(x)), ReLU, no dropout)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # B x H x S x D/H
        x = x + self.out(att.transpose(1, 2).reshape(b, s, d))
        return x + self.fc2(F.relu(self.fc1(self.ln2(x))))


class TransformerRouter(DistilledRouter):
    """ĥ = a small causal Transformer over the token ids (paper Table 6; the authors' code builds a GPT-Neo
    of K layers with global attention and ReLU, initialised N(0, 0.02), and routes from its last hidden state).

    Position t attends to the non-pad tokens up to t, and positions count non-pad tokens as fairseq's do, so a
    left-padded source routes like an unpadded one and a prefix routes like the full sequence (incremental
    decoding). Heads: the largest count up to GPT-Neo's 12 that divides the feature size."""

    max_positions = 1024  # GPT-Neo's

    def __init__(self, vocab_size, num_experts, dim, padding_idx, layers: int = 1):
        super().__init__(vocab_size, num_experts, dim, padding_idx)
        heads = max(h for h in range(1, 13) if dim % h == 0)
        self.positions = nn.Embedding(self.max_positions + 1, dim, padding_idx=0)  # 0: padding
        self.blocks = nn.ModuleList(_CausalBlock(dim, heads) for _ in range(layers))
        self.final_norm = nn.LayerNorm(dim)
        for name, p in self.named_parameters():
            if name != "centroids" and p.dim() > 1:
                nn.init.normal_(p, std=0.02)  # GPT-Neo's initializer_range
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        self.embed.weight.data[padding_idx].zero_()
        self.positions.weight.data[0].zero_()

    def features(self, tokens):
        real = tokens.ne(self.padding_idx)
        positions = torch.cumsum(real, 1) * real  # 1, 2, ... over real tokens, 0 at pads
        s = tokens.shape[1]
        if s > self.max_positions and int(positions.max()) > self.max_positions:
            raise ValueError(f"--distilled-router transformer sees at most {self.max_positions} tokens of a "
                             f"sequence (got {int(positions.max())}); use shorter sequences (--tokens-per-sample, "
                             f"--max-source-positions) or another --distilled-router")
        x = self.embed(tokens) + self.positions(positions)
        causal = torch.ones(s, s, dtype=torch.bool, device=tokens.device).tril()
        # a pad query attends to itself alone, so no row is empty (an all-masked softmax is NaN)
        allowed = (causal & real[:, None, :]) | torch.eye(s, dtype=torch.bool, device=tokens.device)
        allowed = allowed[:, None]  # B x 1 x S x S, shared by the heads
        for block in self.blocks:
            x = block(x, allowed)
        return self.final_norm(x)


DISTILLED_ROUTERS = {"wordemb": WordEmbeddingRouter, "cnn": CNNRouter, "bigram": BigramRouter,
                     "transformer": TransformerRouter}


def build_distilled_router(settings, vocab_size: int, padding_idx: int) -> DistilledRouter:
    """The router that --distilled-router names, with its --distilled-dim (and --distilled-router-layers)."""
    kind = settings.distilled_router
    options = {"layers": settings.distilled_router_layers} if kind == "transformer" else {}
    return DISTILLED_ROUTERS[kind](vocab_size, settings.moe_experts, settings.distilled_dim, padding_idx, **options)
