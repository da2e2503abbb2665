"""MetaMAE: a masked auto-encoder whose latent is adapted by a meta-learning inner step.

Reads top to bottom like the paper's figure (Jang et al., NeurIPS 2023):

    x ──tokenizer──▶ tokens ──mask──▶ visible ──encoder──▶ z
    z ──decoder on the support set──▶ ℓ_s(z) ──z* = z − α ∇_z [B · ℓ_s(z)]──▶ z*
    loss = reconstruction of the hidden tokens from z*  +  λ · contrast(z, z*)

The inner step differentiates B · ℓ_s, as the published code does: ℓ_s averages over the whole batch,
so the factor B (the global batch size) makes each example's step independent of the batch size.
With `method="mae"` the inner step and the contrastive term are switched off and this is MAE.
The exact computation (draws, support set, normalisers, initialisation) follows the authors'
published code, as docs/objective.md states it; tests/test_objective.py pins it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from metamae.modality import Batch, Spec, check_batch


@dataclass
class ModelConfig:
    """Backbone sizes. Defaults: the DABS backbone the paper uses."""
    enc_width: int = 256
    enc_depth: int = 12
    enc_heads: int = 8
    dec_width: int = 128
    dec_depth: int = 4
    dec_heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.1          # encoder only
    projector_dim: int = 128

    def __post_init__(self):
        for part in ("enc", "dec"):
            width, depth, heads = (getattr(self, f"{part}_{size}") for size in ("width", "depth", "heads"))
            if min(width, depth, heads) < 1 or width % heads or width % 4:
                raise ValueError(f"model.{part}_width={width}, model.{part}_depth={depth}, "
                                 f"model.{part}_heads={heads}: expected positive sizes and a width divisible "
                                 f"by the heads and by 4 (the 2-D sin-cos position table)")
        if self.mlp_ratio <= 0 or self.projector_dim < 1:
            raise ValueError(f"model.mlp_ratio={self.mlp_ratio}, model.projector_dim={self.projector_dim}: "
                             f"expected both positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout is {self.dropout}; expected 0 <= dropout < 1")


@dataclass
class ObjectiveConfig:
    """The pretraining objective. Defaults: the published training script's."""
    method: str = "metamae"       # "metamae" or "mae"
    mask_ratio: float = 0.5       # m
    inner_lr: float = 0.5         # α, the inner-step size (on B · ℓ_s)
    inner_steps: int = 1          # k; the paper uses 1
    learn_inner_lr: bool = False  # train α with the model (extension; the paper keeps it fixed)
    first_order: bool = False     # treat ∇_z ℓ_s as a constant in the outer gradient
    support_ratio: float = 0.1    # r, the "nearby-S" ratio
    contrastive_weight: float = 0.1   # λ
    temperature: float = 0.5      # τ; hard-coded 0.5 in the published code

    def __post_init__(self):
        if self.method not in ("metamae", "mae"):
            raise ValueError(f"objective.method is {self.method!r}; expected 'metamae' or 'mae'")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"objective.mask_ratio is {self.mask_ratio}; expected 0 < m < 1 (some tokens "
                             f"hidden, some visible)")
        if not 0.0 <= self.support_ratio <= 1.0:
            raise ValueError(f"objective.support_ratio is {self.support_ratio}; expected 0 <= r <= 1")
        if self.inner_lr < 0 or self.contrastive_weight < 0:
            raise ValueError(f"objective.inner_lr={self.inner_lr}, objective.contrastive_weight="
                             f"{self.contrastive_weight}: expected both >= 0")
        if self.inner_steps < 1:
            raise ValueError(f"objective.inner_steps is {self.inner_steps}; expected >= 1")
        if self.temperature <= 0:
            raise ValueError(f"objective.temperature is {self.temperature}; expected > 0")


@dataclass
class Losses:
    """Every term of one loss evaluation; `total` is the one to backpropagate."""
    total: torch.Tensor
    reconstruction: torch.Tensor                       # hidden tokens, from z* (from z for MAE)
    contrastive: Optional[torch.Tensor] = None         # NT-Xent between z and z*
    support_before: Optional[torch.Tensor] = None      # ℓ_s(z), before the inner step
    support_after: Optional[torch.Tensor] = None       # ℓ_s(z*), after it
    inner_lr: Optional[torch.Tensor] = None            # α

    def scalars(self) -> dict[str, float]:
        return {name: float(value.detach()) for name, value in vars(self).items() if value is not None}


# --------------------------------------------------------------------------------------------
# Transformer blocks (pre-norm; no qkv bias; MLP fc1 → exact GELU → fc2)
# --------------------------------------------------------------------------------------------

# On a 2-core AMD EPYC the fused attention kernel is slower than the spelled-out product for short
# sequences (forward + backward, batch 64, 8 heads of 32, 2 threads: 7.7 vs 2.8 ms at 11 tokens, 47
# vs 37 ms at 96, 79 vs 158 ms at 128); on a 2-core Intel Xeon (AVX-512) it is faster at every length
# (2.6 vs 6.6 ms at 11 tokens), yet a whole dabs training step changes by under 4 % there.
# The encoder sees 10 (PAMAP2, m = 0.85) to 33 (ImageNet32, m = 0.5) tokens with cls, the decoder 65 for
# both and up to 251 (Genomics): the fused kernel is used only from 128 tokens on, and never twice differentiated.
CPU_FUSED_ATTENTION_MIN_TOKENS = 128


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, twice_differentiable: bool) -> torch.Tensor:
    """softmax(q kᵀ / √d) v: queries B × H × R × d over keys and values B × H × T × d. The fused kernel
    has no double backward, which the inner step needs through the decoder, and loses to the
    spelled-out product on short CPU sequences."""
    if twice_differentiable or (q.device.type == "cpu" and k.shape[-2] < CPU_FUSED_ATTENTION_MIN_TOKENS):
        return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, twice_differentiable: bool = False,
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x B × T × W -> B × T × W; with rows (B × R indices into T), only those tokens query (keys and
        values from all T): B × R × W."""
        B, T, W = x.shape
        H, hd = self.heads, W // self.heads
        if rows is None:
            q, k, v = self.qkv(x).view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)   # B × H × T × hd each
        else:
            w_q, w_kv = self.qkv.weight.split([W, 2 * W])                     # qkv has no bias
            q = F.linear(gather_rows(x, rows), w_q).view(B, -1, H, hd).transpose(1, 2)   # B × H × R × hd
            k, v = F.linear(x, w_kv).view(B, T, 2, H, hd).permute(2, 0, 3, 1, 4)         # B × H × T × hd
        o = attention(q, k, v, twice_differentiable)                             # B × H × R × hd
        return self.drop(self.proj(o.transpose(1, 2).reshape(B, -1, W)))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout)
        self.mlp = MLP(width, int(width * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor, twice_differentiable: bool = False,
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x B × T × W -> B × T × W; with rows (B × R indices into T), only those tokens' outputs:
        B × R × W."""
        attended = self.attn(self.norm1(x), twice_differentiable, rows)
        x = (x if rows is None else gather_rows(x, rows)) + attended
        return x + self.mlp(self.norm2(x))


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x B × T × W, rows B × R indices into T -> B × R × W."""
    return torch.gather(x, 1, rows[:, :, None].expand(-1, -1, x.shape[-1]))


# --------------------------------------------------------------------------------------------
# The batch a step sees, possibly split over data-parallel processes
# --------------------------------------------------------------------------------------------

class BatchGroup:
    """The processes one batch is split over; here, one process holding all of it.

    The terms that mix examples (the loss normalisers, the contrastive negatives, the projector's
    BatchNorm statistics) are computed over the whole group's batch, so a data-parallel run gives
    the same loss as one process with the same global batch. metamae.distributed.collectives
    spans torch.distributed processes; both operations keep gradients.
    """
    size: int = 1
    rank: int = 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of `t` over the group's processes."""
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """The group's tensors concatenated along dim 0, in rank order."""
        return t


ONE_PROCESS = BatchGroup()


class GroupBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the group's whole batch.

    With one process this is nn.BatchNorm1d. (torch's SyncBatchNorm does the same on GPUs only.)
    """
    group: BatchGroup = ONE_PROCESS

    def forward(self, x: torch.Tensor) -> torch.Tensor:                # x: b × C, b = B / group size
        if not self.training or self.group.size == 1:
            return super().forward(x)
        n = x.shape[0] * self.group.size                               # B
        moments = self.group.sum(torch.cat([x.sum(0), (x * x).sum(0)])) / n   # 2C: E[x], E[x²]
        mean, var = moments.chunk(2)
        var = var - mean * mean                                        # biased, as BatchNorm normalises
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


# --------------------------------------------------------------------------------------------
# The pieces of the objective, as pure functions
# --------------------------------------------------------------------------------------------

def random_masking(tokens: torch.Tensor, mask_ratio: float, noise: torch.Tensor):
    """Keep the K = int(N(1 − m)) tokens with the smallest noise (MAE's per-sample shuffle).

    tokens B × N × D, noise B × N uniform -> kept B × K × D, mask B × N (1 = hidden), restore B × N.
    """
    B, N, D = tokens.shape
    keep = int(N * (1 - mask_ratio))
    shuffle = torch.argsort(noise, dim=1)                              # ascending: small = keep
    restore = torch.argsort(shuffle, dim=1)
    kept = torch.gather(tokens, 1, shuffle[:, :keep, None].expand(-1, -1, D))
    mask = torch.ones(B, N, dtype=tokens.dtype, device=tokens.device)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, restore), restore


def support_set(mask: torch.Tensor, nearby: torch.Tensor, uniforms: torch.Tensor, ratio: float) -> torch.Tensor:
    """Every visible token, plus each hidden token next to a visible one with probability r.

    mask B × N (1 = hidden), nearby B × N bool, uniforms B × N in [0, 1) -> support B × N in {0, 1}.
    """
    return mask * nearby * (uniforms < ratio) + (1 - mask)


def weighted_rows(weight: torch.Tensor, most: int) -> Optional[torch.Tensor]:
    """The tokens a weighted loss reads, for `most` at least any example's count of weights > 0.

    weight B × N -> B × most indices into N, those of weight > 0 first; None when most >= N.
    """
    if most >= weight.shape[1]:
        return None
    return torch.argsort(weight, dim=1, descending=True, stable=True)[:, :most]


def weighted_mean(token_loss: torch.Tensor, weight: torch.Tensor, group: BatchGroup = ONE_PROCESS) -> torch.Tensor:
    """Σ w ℓ / Σ w over the whole batch (b × N each): R(pred, w) of the objective.

    Over a group, each process returns size · (its Σ w ℓ) / (the group's Σ w): the mean over the
    processes is the global value, and so are the gradients that data parallelism averages.
    """
    return group.size * (token_loss * weight).sum() / group.sum(weight.sum())


def gradient(f, z: torch.Tensor, create_graph: bool):
    """∇_z f(z)[0] and f(z)[1], for f returning (a scalar, an auxiliary value).

    Eager: autograd.grad, 5 % faster there than torch.func. Under torch.compile: torch.func, which
    dynamo traces where it breaks the graph at autograd.grad, so the double backward compiles too.
    """
    if torch.compiler.is_compiling():
        grad, aux = torch.func.grad(f, has_aux=True)(z)
        return (grad if create_graph else grad.detach()), aux
    value, aux = f(z)
    grad, = torch.autograd.grad(value, z, create_graph=create_graph)
    return grad, aux


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float, group: BatchGroup = ONE_PROCESS) -> torch.Tensor:
    """Symmetric InfoNCE between two views, b × P each; row i's positive is row i of the other view.

    The negatives are every other row of the group's whole batch (2B − 2 of them); each process
    scores its own 2b rows, so the mean over processes is the global loss.
    """
    queries = torch.cat([F.normalize(a, dim=1), F.normalize(b, dim=1)])   # 2b × P
    keys = torch.cat([group.gather(queries[:len(a)]), group.gather(queries[len(a):])])   # 2B × P
    logits = queries @ keys.t() / temperature                           # 2b × 2B
    B, rows = len(keys) // 2, torch.arange(len(a), device=a.device) + group.rank * len(a)
    own, positive = torch.cat([rows, rows + B]), torch.cat([rows + B, rows])
    logits = logits.masked_fill(F.one_hot(own, 2 * B).bool(), float("-inf"))   # not itself
    return F.cross_entropy(logits, positive)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

class MetaMAE(nn.Module):
    def __init__(self, spec: Spec, model: ModelConfig = ModelConfig(),
                 objective: ObjectiveConfig = ObjectiveConfig()):
        super().__init__()
        self.spec, self.config, self.objective = spec, model, objective
        self.group = ONE_PROCESS
        D, Dd = model.enc_width, model.dec_width
        self.tokenizer = spec.tokenizer(D, Dd)       # embedding in, reconstruction head out
        N = self.tokenizer.num_tokens
        if int(N * (1 - objective.mask_ratio)) < 1:
            raise ValueError(f"objective.mask_ratio={objective.mask_ratio} leaves none of the {N} tokens of "
                             f"{spec.kind} input visible (K = int(N·(1 − m)) = 0): lower it")

        # encoder
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.register_buffer("enc_pos", self.tokenizer.positions(D), persistent=False)   # 1 × (1+N) × D
        self.enc_drop = nn.Dropout(model.dropout)
        self.encoder = nn.ModuleList(Block(D, model.enc_heads, model.mlp_ratio, model.dropout)
                                     for _ in range(model.enc_depth))
        self.enc_norm = nn.LayerNorm(D)

        # decoder
        self.dec_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.register_buffer("dec_pos", self.tokenizer.positions(Dd), persistent=False)  # 1 × (1+N) × D'
        self.decoder = nn.ModuleList(Block(Dd, model.dec_heads, model.mlp_ratio, 0.0)
                                     for _ in range(model.dec_depth))
        self.dec_norm = nn.LayerNorm(Dd)
        self._init_weights()

        # MetaMAE's task-contrastive projector (PyTorch's default initialisation) and α
        if objective.method == "metamae":
            self.projector = nn.Sequential(nn.Linear(D, 4 * D, bias=False), GroupBatchNorm1d(4 * D),
                                           nn.ReLU(), nn.Linear(4 * D, model.projector_dim, bias=False))
            self.inner_lr = nn.Parameter(torch.tensor(float(objective.inner_lr)),
                                         requires_grad=objective.learn_inner_lr)

    def split_batch_over(self, group: BatchGroup) -> None:
        """Data parallelism: compute the terms that mix examples over `group`'s whole batch."""
        self.group = group
        for m in self.modules():
            if isinstance(m, GroupBatchNorm1d):
                m.group = group

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.tokenizer.init_weights()
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    # ---- encoder -------------------------------------------------------------------------------

    def _run_encoder(self, tokens: torch.Tensor) -> torch.Tensor:
        """B × T × D embedded tokens (positions added) -> B × (1+T) × D, cls first."""
        cls = (self.cls_token + self.enc_pos[:, :1]).expand(tokens.shape[0], -1, -1)
        z = self.enc_drop(torch.cat([cls, tokens], dim=1))
        for block in self.encoder:
            z = block(z)
        return self.enc_norm(z)

    def encode(self, x: Batch, masking_noise: torch.Tensor):
        """x -> z B × (1+K) × D (cls, then the visible tokens in kept order), mask, restore."""
        tokens = self.tokenizer.embed(x) + self.enc_pos[:, 1:]                # B × N × D
        kept, mask, restore = random_masking(tokens, self.objective.mask_ratio, masking_noise)
        return self._run_encoder(kept), mask, restore

    def features(self, x: Batch, per_token: bool = False) -> torch.Tensor:
        """Linear-evaluation features, no masking: mean of the N token outputs (B × D), or B × N × D."""
        check_batch(self.spec, x)
        z = self._run_encoder(self.tokenizer.embed(x) + self.enc_pos[:, 1:])[:, 1:]
        return z if per_token else z.mean(dim=1)

    # ---- decoder -------------------------------------------------------------------------------

    def decode(self, z: torch.Tensor, restore: torch.Tensor, twice_differentiable: bool = False,
               rows: Optional[torch.Tensor] = None) -> Batch:
        """z B × (1+K) × D -> predictions for all N tokens, in their original order.

        rows (B × R token indices): the only tokens whose predictions the caller reads. The last
        block then computes just those (their keys and values still come from every token), and
        every other token's prediction is the head's output for a zero vector: weigh them 0.
        """
        h = self.dec_embed(z)                                                  # B × (1+K) × D'
        B, K1, Dd = h.shape
        N = restore.shape[1]
        h_tokens = torch.cat([h[:, 1:], self.mask_token.expand(B, N + 1 - K1, Dd)], dim=1)   # B × N × D'
        h_tokens = gather_rows(h_tokens, restore)                              # un-shuffle
        h = torch.cat([h[:, :1], h_tokens], dim=1) + self.dec_pos              # B × (1+N) × D'
        for block in self.decoder[:-1]:
            h = block(h, twice_differentiable)
        if rows is None:
            h = self.dec_norm(self.decoder[-1](h, twice_differentiable))      # B × (1+N) × D'
        else:
            at = 1 + rows                                                      # into h's rows, cls first
            h_rows = self.dec_norm(self.decoder[-1](h, twice_differentiable, at))        # B × R × D'
            h = h_rows.new_zeros(B, 1 + N, Dd).scatter(1, at[:, :, None].expand(-1, -1, Dd), h_rows)
        return self.tokenizer.reconstruct(h[:, 1:])

    # ---- the meta-learning step ----------------------------------------------------------------

    def adapt(self, z: torch.Tensor, restore: torch.Tensor, target: Batch, support: torch.Tensor):
        """k inner steps z ← z − α ∇_z [B · R(dec(z), s)] on the support set s.

        Returns z* and ℓ_s(z) before the first step. Second order keeps ∇_z in the graph, so the
        outer gradient flows through it; first order treats it as a constant.

        The decoder's last block computes only the support tokens' rows: as many as the batch's
        largest support set (PAMAP2, K = 9: 12-17 of 64), or under torch.compile, which keeps
        shapes static, as many as a support set can hold, K·(1 + neighbours) (27).
        """
        second_order = not self.objective.first_order
        most = (z.shape[1] - 1) * (1 + self.tokenizer.neighbours)             # K visible + their neighbours
        if not torch.compiler.is_compiling():
            most = min(most, int(support.sum(1).max()))                        # this batch's (a host sync)
        rows = weighted_rows(support, most)                                    # B × most, or None (all N)

        def scaled_support_loss(z):
            pred = self.decode(z, restore, twice_differentiable=second_order, rows=rows)
            support_loss = weighted_mean(self.tokenizer.token_loss(pred, target), support, self.group)
            # b · size · (Σ_b s ℓ) / (Σ_B s) = B · R: its gradient at this process's z is the global one
            return support_loss * z.shape[0], support_loss

        support_before = None
        with torch.enable_grad():                    # the inner step differentiates, even under no_grad
            if not z.requires_grad:
                z = z.detach().requires_grad_()
            for _ in range(self.objective.inner_steps):
                grad, support_loss = gradient(scaled_support_loss, z, create_graph=second_order)
                if support_before is None:
                    support_before = support_loss
                z = z - self.inner_lr * grad                                   # B × (1+K) × D
        return z, support_before

    def contrast(self, z: torch.Tensor, z_adapted: torch.Tensor) -> torch.Tensor:
        """Task contrast: the mean visible token of z and of z*, projected, as two views."""
        return nt_xent(self.projector(z[:, 1:].mean(dim=1)), self.projector(z_adapted[:, 1:].mean(dim=1)),
                       self.objective.temperature, self.group)

    # ---- the objective -------------------------------------------------------------------------

    def forward(self, x: Batch, masking_noise: Optional[torch.Tensor] = None,
                support_noise: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> Losses:
        """One loss evaluation. Two B × N uniform draws, in this order: masking, then support.

        Pass them explicitly (masking_noise, support_noise) to pin them, or a torch.Generator.
        """
        check_batch(self.spec, x)
        B, N = _batch_size(x), self.tokenizer.num_tokens
        device = self.cls_token.device
        if masking_noise is None:
            masking_noise = torch.rand(B, N, device=device, generator=generator)
        target = self.tokenizer.targets(x)
        z, mask, restore = self.encode(x, masking_noise)                       # z: B × (1+K) × D

        if self.objective.method == "mae":
            reconstruction = weighted_mean(self.tokenizer.token_loss(self.decode(z, restore), target), mask,
                                           self.group)
            return Losses(total=reconstruction, reconstruction=reconstruction)

        if support_noise is None:
            support_noise = torch.rand(B, N, device=device, generator=generator)
        nearby = self.tokenizer.nearby(mask == 0)
        support = support_set(mask, nearby, support_noise, self.objective.support_ratio)   # B × N
        z_adapted, support_before = self.adapt(z, restore, target, support)

        token_loss = self.tokenizer.token_loss(self.decode(z_adapted, restore), target)    # B × N
        reconstruction = weighted_mean(token_loss, mask, self.group)
        contrastive = self.contrast(z, z_adapted)
        return Losses(total=reconstruction + self.objective.contrastive_weight * contrastive,
                      reconstruction=reconstruction, contrastive=contrastive,
                      support_before=support_before.detach(),
                      support_after=weighted_mean(token_loss.detach(), support, self.group),
                      inner_lr=self.inner_lr.detach())


def _batch_size(x: Batch) -> int:
    return (x[0] if isinstance(x, (tuple, list)) else x).shape[0]
