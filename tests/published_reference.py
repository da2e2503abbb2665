"""Test oracle: an independent, plain-PyTorch re-implementation of the published MetaMAE objective.

This module re-implements, from the specification in ``docs/objective.md`` (which describes
alinlab/MetaMAE, ``models.py``), the published MAE / MetaMAE model and loss.  It is used
ONLY by tests, as an oracle that the project's implementation is compared against draw for draw:
the two random draws of a loss call (masking noise ``u0`` and support uniforms ``u1``, both
B x N float32) are passed in explicitly.  It deliberately imports nothing from the project and
depends on torch + numpy only (no timm).

Attribute names mirror the published code so that weights can be copied in by name.

Notes for test writers
- Token models: ``forward_decoder`` returns logits B x V x N (the layout ``F.cross_entropy`` wants,
  as in the published code).
- ``alpha`` is kept as a Python float.  The published code stores it as a float32 tensor, so for
  step sizes that are not exactly representable in float32 (e.g. 0.1) the published value is
  float32(alpha); use dyadic values (0.5, 0.25, ...) when comparing in float64 at tight tolerance.
- With dropout > 0 the dropout RNG is consumed in the published order: encoder input dropout, then
  per encoder block: after attn.proj, after GELU, after fc2.  Decoder blocks have no dropout.
- Modules are constructed in the published order (projector last, after the Xavier pass), so a
  model built after ``torch.manual_seed(s)`` is meant to draw the same initial weights as the
  published code under the same seed (not checked against timm; tests should copy weights by name).
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------- positions
def sincos_1d(width, pos):
    """pos: (M,) numpy -> (M, width) float64; [sin(n w_i), cos(n w_i)], w_i = 10000^(-i/(width/2))."""
    assert width % 2 == 0
    omega = np.arange(width // 2, dtype=np.float64) / (width / 2.0)
    omega = 1.0 / 10000 ** omega                                   # (width/2,)
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)  # (M, width/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)      # (M, width)


def pos_table(width, kind, n_tokens):
    """1 x (1+N) x width float32 tensor; the cls row is zeros."""
    if kind == "2d":
        g = int(round(n_tokens ** 0.5))
        assert g * g == n_tokens
        gw, gh = np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32))  # (g, g) each
        # first half of channels: column index (grid_w), second half: row index (grid_h)
        emb = np.concatenate([sincos_1d(width // 2, gw), sincos_1d(width // 2, gh)], axis=1)  # (N, width)
    else:
        emb = sincos_1d(width, np.arange(n_tokens, dtype=np.float32))                          # (N, width)
    emb = np.concatenate([np.zeros([1, width]), emb], axis=0)                                   # (1+N, width)
    return torch.from_numpy(emb).float().unsqueeze(0)


# ----------------------------------------------------------------------------- transformer block
class RefAttention(nn.Module):
    def __init__(self, w, heads, drop):
        super().__init__()
        self.heads, self.scale = heads, (w // heads) ** -0.5
        self.qkv = nn.Linear(w, 3 * w, bias=False)
        self.proj = nn.Linear(w, w)
        self.proj_drop = nn.Dropout(drop)

    def forward(self, x):                                          # x: B x N x w
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                           # B x H x N x hd
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # B x H x N x N (explicit, no SDPA)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)            # B x N x w
        return self.proj_drop(self.proj(x))


class RefMlp(nn.Module):
    def __init__(self, w, drop):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(w, 2 * w), nn.GELU(), nn.Dropout(drop)  # exact GELU
        self.fc2, self.drop2 = nn.Linear(2 * w, w), nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class RefBlock(nn.Module):
    """timm Block(w, heads, mlp_ratio=2, qkv_bias=False, drop=p): pre-norm, residual."""

    def __init__(self, w, heads, drop=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(w, eps=1e-5)
        self.attn = RefAttention(w, heads, drop)
        self.norm2 = nn.LayerNorm(w, eps=1e-5)
        self.mlp = RefMlp(w, drop)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------- model
class RefMetaMAE(nn.Module):
    def __init__(self, kind, channels, length, patch, vocab=None, enc_dim=256, enc_depth=12,
                 enc_heads=8, dec_dim=128, dec_depth=4, dec_heads=4, dropout=0.0, mask_ratio=0.5,
                 inner_lr=0.5, reg_weight=1.0, s_ratio=0.1, first_order=False, temperature=0.5):
        super().__init__()
        assert kind in ("1d", "2d", "tokens")
        self.kind, self.C, self.p = kind, channels, patch
        self.mask_ratio, self.alpha, self.lam = mask_ratio, float(inner_lr), reg_weight
        self.s_ratio, self.first_order, self.tau = s_ratio, first_order, temperature
        D, Dd = enc_dim, dec_dim
        if kind == "1d":
            self.N, patch_dim = length // patch, channels * patch
            self.patch_embed = nn.Conv1d(channels, D, patch, stride=patch, bias=True)
        elif kind == "2d":
            self.grid = length // patch
            self.N, patch_dim = self.grid ** 2, channels * patch * patch
            self.patch_embed = nn.Conv2d(channels, D, patch, stride=patch, bias=True)
        else:
            self.N, patch_dim = length, D                          # one token per position
            self.patch_embed = nn.Embedding(vocab, D)
        # encoder
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.register_buffer("pos_embed", pos_table(D, kind, self.N))          # 1 x (1+N) x D
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.encoder = nn.ModuleList([RefBlock(D, enc_heads, dropout) for _ in range(enc_depth)])
        self.norm_enc = nn.LayerNorm(D, eps=1e-5)
        # decoder
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.register_buffer("decoder_pos_embed", pos_table(Dd, kind, self.N))  # 1 x (1+N) x D'
        self.decoder = nn.ModuleList([RefBlock(Dd, dec_heads, 0.0) for _ in range(dec_depth)])
        self.norm_dec = nn.LayerNorm(Dd, eps=1e-5)
        self.decoder_head = nn.Linear(Dd, patch_dim)              # tokens: D' -> D (tied logits)
        self._init_weights()
        # projector created after the Xavier pass: keeps PyTorch's default init
        self.projector = nn.Sequential(nn.Linear(D, 4 * D, bias=False), nn.BatchNorm1d(4 * D),
                                       nn.ReLU(), nn.Linear(4 * D, 128, bias=False))

    def _init_weights(self):
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w if self.kind == "tokens" else w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_module)

    @staticmethod
    def _init_module(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---------------------------------------------------------------- data
    def patchify(self, x):
        B, p = x.shape[0], self.p
        if self.kind == "tokens":
            return x                                               # B x N token ids
        if self.kind == "1d":                                      # B x C x L -> B x N x (p*C), idx j*C + c
            return x.reshape(B, self.C, self.N, p).permute(0, 2, 3, 1).reshape(B, self.N, p * self.C)
        g = self.grid                                              # B x C x H x W -> B x N x (p*p*C)
        x = x.reshape(B, self.C, g, p, g, p).permute(0, 2, 4, 3, 5, 1)  # B x gh x gw x i x j x C
        return x.reshape(B, g * g, p * p * self.C)                 # idx (i*p + j)*C + c

    def embed(self, x):                                            # -> B x N x D
        e = self.patch_embed(x)
        if self.kind == "1d":
            e = e.transpose(1, 2)                                  # B x D x N -> B x N x D
        elif self.kind == "2d":
            e = e.flatten(2).transpose(1, 2)                       # row-major tokens
        return e

    def random_masking(self, tokens, u0):
        """tokens B x N x D, u0 B x N -> kept B x K x D, mask B x N (1 = hidden), ids_restore B x N."""
        B, N, D = tokens.shape
        K = int(N * (1 - self.mask_ratio))
        ids_shuffle = torch.argsort(u0, dim=1, stable=True)        # ascending: first K are kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        kept = torch.gather(tokens, 1, ids_shuffle[:, :K].unsqueeze(-1).expand(-1, -1, D))
        mask = torch.ones(B, N, dtype=tokens.dtype, device=tokens.device)
        mask[:, :K] = 0
        mask = torch.gather(mask, 1, ids_restore)                  # back to token order
        return kept, mask, ids_restore

    # ---------------------------------------------------------------- encoder / decoder
    def forward_encoder(self, x, u0):
        e = self.embed(x) + self.pos_embed[:, 1:]                  # B x N x D
        e, mask, ids_restore = self.random_masking(e, u0)          # B x K x D
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(e.shape[0], -1, -1)
        h = self.dropout(torch.cat([cls, e], dim=1))               # B x (1+K) x D
        for blk in self.encoder:
            h = blk(h)
        return self.norm_enc(h), mask, ids_restore

    def forward_decoder(self, z, ids_restore):
        """z B x (1+K) x D -> B x N x patch_dim  (tokens: logits B x V x N)."""
        h = self.decoder_embed(z)                                  # B x (1+K) x D'
        B, N, Dd = h.shape[0], ids_restore.shape[1], h.shape[2]
        h_ = torch.cat([h[:, 1:], self.mask_token.expand(B, N + 1 - h.shape[1], -1)], dim=1)  # B x N x D'
        h_ = torch.gather(h_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))  # un-shuffle
        h = torch.cat([h[:, :1], h_], dim=1) + self.decoder_pos_embed          # B x (1+N) x D'
        for blk in self.decoder:
            h = blk(h)
        out = self.decoder_head(self.norm_dec(h))[:, 1:]           # drop cls: B x N x patch_dim
        if self.kind == "tokens":
            out = (out @ self.patch_embed.weight.t()).transpose(1, 2)  # tied: B x V x N
        return out

    # ---------------------------------------------------------------- losses
    def recon_loss(self, pred, target, weight):
        """sum(w * loss) / sum(w) over the whole batch; loss per token: B x N."""
        if self.kind == "tokens":
            loss = F.cross_entropy(pred, target, reduction="none")    # B x N
        else:
            loss = ((pred - target) ** 2).mean(dim=-1)                # B x N
        return (loss * weight).sum() / weight.sum()

    def nearby(self, mask):
        """visible or with a visible neighbour (1-D: left/right; 2-D: 4-neighbourhood), zero padding."""
        v = 1 - mask                                               # B x N
        if self.kind == "2d":
            g = self.grid
            v = v.reshape(-1, g, g)                                # B x rows x cols
            vp = F.pad(v, (1, 1, 1, 1))
            near = v + vp[:, :-2, 1:-1] + vp[:, 2:, 1:-1] + vp[:, 1:-1, :-2] + vp[:, 1:-1, 2:]
            return (near > 0).to(mask.dtype).reshape(mask.shape)
        vp = F.pad(v, (1, 1))                                      # B x (N+2)
        return ((v + vp[:, :-2] + vp[:, 2:]) > 0).to(mask.dtype)

    def mae_loss(self, x, u0):
        z, mask, ids_restore = self.forward_encoder(x, u0)
        return self.recon_loss(self.forward_decoder(z, ids_restore), self.patchify(x), mask)

    def metamae_loss(self, x, u0, u1):
        z, mask, ids_restore = self.forward_encoder(x, u0)         # z: B x (1+K) x D
        if not z.requires_grad:                                    # e.g. frozen parameters
            z = z.detach().requires_grad_()
        target, B = self.patchify(x), x.shape[0]
        # support: every visible token, plus hidden tokens next to a visible one with prob r
        support = mask * self.nearby(mask) * (u1 < self.s_ratio).to(mask.dtype) + (1 - mask)
        # inner step on the whole latent (cls row included)
        inner = self.recon_loss(self.forward_decoder(z, ids_restore), target, support)
        g, = torch.autograd.grad(inner * B, z, create_graph=not self.first_order)
        z_star = z - self.alpha * g                                # B x (1+K) x D
        # outer reconstruction on hidden tokens
        recon = self.recon_loss(self.forward_decoder(z_star, ids_restore), target, mask)
        # symmetric NT-Xent between the two views (projector called once per view)
        e1 = F.normalize(self.projector(z[:, 1:].mean(dim=1)))     # B x 128
        e2 = F.normalize(self.projector(z_star[:, 1:].mean(dim=1)))
        E = torch.cat([e1, e2])                                    # 2B x 128
        S = (E @ E.t()) / self.tau                                 # 2B x 2B
        S = S.masked_fill(torch.eye(2 * B, dtype=torch.bool, device=S.device), float("-inf"))
        labels = torch.cat([torch.arange(B, 2 * B), torch.arange(B)]).to(S.device)
        contrastive = F.cross_entropy(S, labels)
        return dict(loss=recon + self.lam * contrastive, recon=recon, contrastive=contrastive,
                    z=z, z_star=z_star, mask=mask, support=support, ids_restore=ids_restore)

    def features(self, x):
        """Linear-evaluation features: no masking, mean of the final LayerNorm's non-cls rows."""
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.embed(x)], 1) + self.pos_embed
        for blk in self.encoder:
            h = blk(h)
        return self.norm_enc(h)[:, 1:].mean(dim=1)
