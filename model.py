"""A Llama-style GPT whose feed-forward blocks are chosen per layer: dense SwiGLU, product-key memory,
mixture of experts or PEER (FFN_KINDS).

RMSNorm, rotary position embeddings, causal scaled-dot-product attention, SwiGLU FFN, no biases in
attention or FFN. The model owns the memory value tables (one shared by all memory layers, or one per
layer) and hands them to the memory layers at call time: no global state, two models never share.
"""
import math
from dataclasses import dataclass, fields
from itertools import combinations

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import need
from memory import ProductKeyMemory, ValueTable
from moe import MoE
from peer import PEER
from engram import Engram

# The feed-forward kinds: the GPTConfig field listing a kind's 0-based layers, and its block class. Every
# other layer holds a dense SwiGLU. A block class (docs/method.md, "Adding a block") provides:
#   from_config(config)  the block of one layer, built from its GPTConfig fields (a prefix of its own)
#   check_config(config) a ConfigError (errors.need) for any of those fields that cannot work
#   reads                what forward takes besides x, by name: "values" (the layer's ValueTable, made by the
#                        model from the block's table_shape(), shared by every layer of the kind when its
#                        share_table is true), "idx" (the token ids at x's positions, (B, T)) and "prefix"
#                        (None, or when decoding with a KV cache the window's tokens before idx, (B, P))
#   forward(x, **reads)  x (B, T, n_embd), normalised -> (B, T, n_embd), added to the residual stream
#   reset_parameters(), active_params() (per token, rows read included), flops_per_token() (2 per multiply-add)
#   and may provide aux_loss() (added to the training loss) and lora_targets (Linears finetune's LoRA adapts).
FFN_KINDS = {"memory_layers": ProductKeyMemory, "moe_layers": MoE, "peer_layers": PEER, "engram_layers": Engram}


@dataclass
class GPTConfig:
    # the GPT
    vocab_size: int = 50304  # from the dataset's meta.json
    block_size: int = 256  # context length in tokens
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # attention heads
    n_embd: int = 384  # width of the residual stream
    ffn_hidden: int = 0  # SwiGLU hidden size; 0: 8/3 * n_embd rounded up to a multiple of 64
    tie_embeddings: bool = True  # the output layer shares the token embedding
    rope_theta: float = 10000.0  # base of the rotary position embedding
    norm_eps: float = 1e-5  # RMSNorm epsilon
    # memory layers (memory.py, docs/method.md section 1)
    memory_layers: tuple = ()  # 0-based layers whose FFN is a product-key memory layer
    mem_n_keys: int = 128  # sub-keys per half: n_keys**2 values
    mem_heads: int = 4  # query heads per memory layer
    mem_knn: int = 32  # rows read per head (heads*knn per token)
    mem_k_dim: int = 0  # query size per head; 0: n_embd // 2
    mem_v_dim: int = 0  # value size; 0: n_embd (must be n_embd without swilu)
    mem_share_values: bool = True  # one table for all memory layers (Memory+) or one each
    mem_swilu: bool = True  # Memory+ gated output projection
    mem_qk_norm: bool = False  # RMS-normalise query halves and sub-keys (for unstable small models)
    # mixture-of-experts layers (moe.py): SwiGLU experts, token-choice top-k, dropless
    moe_layers: tuple = ()  # 0-based layers whose FFN is an MoE
    moe_num_experts: int = 8  # experts per MoE layer
    moe_top_k: int = 1  # experts per token
    moe_hidden: int = 0  # hidden size of each expert; 0: ffn_hidden
    moe_aux_loss_weight: float = 0.01  # Switch load-balancing loss, added to the training loss
    moe_z_loss_weight: float = 0.001  # router z-loss, added to the training loss
    # PEER layers (peer.py): product-key retrieval of peer_n_keys**2 single-neuron experts
    peer_layers: tuple = ()  # 0-based layers whose FFN is a PEER layer
    peer_n_keys: int = 128  # sub-keys per half: n_keys**2 experts
    peer_heads: int = 8  # retrieval heads
    peer_knn: int = 16  # experts per head
    peer_k_dim: int = 0  # query size per head; 0: n_embd // 2
    # Engram layers (engram.py): the suffix n-grams of the token ids hashed into a table of engram_rows rows
    engram_layers: tuple = ()  # 0-based layers whose FFN is an Engram block
    engram_rows: int = 65536  # rows of each Engram layer's table
    engram_dim: int = 32  # width of a row
    engram_orders: tuple = (2, 3)  # n-gram lengths hashed at each position
    engram_heads: int = 4  # hashes per n-gram length (rows read per token: len(engram_orders) * engram_heads)

    def __post_init__(self):
        for field in FFN_KINDS:
            setattr(self, field, tuple(getattr(self, field)))
        self.ffn_hidden = self.ffn_hidden or 64 * math.ceil(8 * self.n_embd / 3 / 64)
        self.mem_k_dim = self.mem_k_dim or self.n_embd // 2
        self.mem_v_dim = self.mem_v_dim or self.n_embd
        self.moe_hidden = self.moe_hidden or self.ffn_hidden
        self.peer_k_dim = self.peer_k_dim or self.n_embd // 2
        self.validate()

    def validate(self):
        """A ConfigError naming the first setting that cannot work; each feed-forward kind checks its own."""
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "ffn_hidden"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.n_embd % self.n_head == 0,
             f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        need((self.n_embd // self.n_head) % 2 == 0,
             f"head size n_embd/n_head={self.n_embd // self.n_head} must be even for rotary embeddings")
        for kind in FFN_KINDS:
            layers = getattr(self, kind)
            bad = [i for i in layers if not (isinstance(i, int) and 0 <= i < self.n_layer)]
            need(not bad, f"{kind} names {bad}, but layers are 0..{self.n_layer - 1} (n_layer={self.n_layer})")
            need(len(set(layers)) == len(layers), f"{kind} lists a layer twice: {layers}")
        for a, b in combinations(FFN_KINDS, 2):
            both = sorted(set(getattr(self, a)) & set(getattr(self, b)))
            need(not both, f"layers {both} are listed in both {a} and {b}: a layer has one feed-forward block")
        for kind, block in FFN_KINDS.items():
            if getattr(self, kind):
                block.check_config(self)

    @property
    def residual_std(self):
        """Init std of the projections that write into the residual stream (GPT-2: scaled with depth)."""
        return 0.02 / math.sqrt(2 * self.n_layer)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embeddings (rotate-half form), cached up to block_size."""

    def __init__(self, head_dim, max_len, theta):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, start, length):
        return self.cos[start:start + length], self.sin[start:start + length]


def apply_rotary(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Keys and values of one layer for generation: (batch, heads, max_len, head_dim)."""

    def __init__(self, batch, heads, max_len, head_dim, device, dtype):
        self.k = torch.zeros(batch, heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def update(self, start, k, v):
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    lora_targets = ("qkv", "proj")

    def __init__(self, config):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, cache=None, start=0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        mask, causal = None, True
        if cache is not None:
            k, v = cache.update(start, k, v)
            if start > 0:  # new queries see the whole cache and each other causally
                causal = False
                if T > 1:
                    mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    """The dense feed-forward block, of every layer no FFN_KINDS field lists."""
    reads = ()
    lora_targets = ("w1", "w2", "w3")

    def __init__(self, dim, hidden, out_std=0.02):
        super().__init__()
        self.out_std = out_std
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    @classmethod
    def from_config(cls, c):
        return cls(c.n_embd, c.ffn_hidden, out_std=c.residual_std)

    def reset_parameters(self):
        """The output projection at out_std (scaled with depth); w1 and w3 keep the model's N(0, 0.02)."""
        nn.init.normal_(self.w2.weight, std=self.out_std)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def active_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self):
        return 2 * sum(p.numel() for p in self.parameters())


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        kind = next((block for field, block in FFN_KINDS.items() if layer in getattr(config, field)), SwiGLU)
        self.ffn = kind.from_config(config)

    def forward(self, x, cos, sin, inputs, cache=None, start=0):
        """inputs: what the feed-forward block may read ("values", "idx"); it is handed those it names."""
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, start)
        return x + self.ffn(self.ffn_norm(x), **{name: inputs[name] for name in self.ffn.reads})


class GPT(nn.Module):
    def __init__(self, config, value_table=ValueTable):
        """value_table(num_values, v_dim) makes each value table; training on several ranks passes one that
        holds a column shard (distributed.Parallel.value_table)."""
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.rotary = RotaryEmbedding(config.n_embd // config.n_head, config.block_size, config.rope_theta)
        # value tables: values[table_of_layer[i]] serves layer i, one per layer that reads one, or one per kind
        # whose blocks share theirs; in layer order, so a checkpoint's tables keep their names
        shapes, self.table_of_layer = {}, {}
        for i, block in enumerate(self.blocks):
            if "values" in block.ffn.reads:
                key = type(block.ffn) if block.ffn.share_table else i
                self.table_of_layer[i] = shapes.setdefault(key, (len(shapes), block.ffn.table_shape()))[0]
        self.values = nn.ModuleList(value_table(*shape) for _, shape in shapes.values())
        self.reset_parameters()

    def reset_parameters(self):
        """GPT-2 style init for dense weights (residual projections scaled by depth); the feed-forward blocks
        then reset their own. The value tables initialised themselves, once, where they were made."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=self.config.residual_std)
            block.ffn.reset_parameters()

    def forward(self, idx, targets=None, caches=None, start=0, prefix=None):
        """idx (B, T) token ids -> logits (B, T, vocab) and the mean cross-entropy when targets are given,
        plus the blocks' auxiliary losses in training mode.

        caches/start: per-layer KVCache and the position of idx[:, 0], for incremental generation; prefix: the
        window's tokens before idx then, for the blocks that read token ids (FFN_KINDS).
        """
        T = idx.shape[1]
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}")
        cos, sin = self.rotary(start, T)
        x = self.tok_emb(idx)
        for i, block in enumerate(self.blocks):
            inputs = {"idx": idx, "prefix": prefix,
                      "values": self.values[self.table_of_layer[i]] if i in self.table_of_layer else None}
            x = block(x, cos, sin, inputs, caches[i] if caches else None, start)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            if self.training:  # the blocks' auxiliary losses train the model; evaluation is cross-entropy alone
                loss = loss + sum(b.ffn.aux_loss() for b in self.blocks if hasattr(b.ffn, "aux_loss"))
        return logits, loss

    def routing_stats(self):
        """The MoE routers' latest load-balancing and z-losses (means over MoE layers, unweighted) and each
        MoE layer's fraction of token slots per expert, as JSON-ready numbers for the training log."""
        moe = {i: b.ffn for i, b in enumerate(self.blocks) if isinstance(b.ffn, MoE) and b.ffn.z_loss is not None}
        if not moe:
            return {}
        return {"moe_balance_loss": sum(m.balance_loss.item() for m in moe.values()) / len(moe),
                "moe_z_loss": sum(m.z_loss.item() for m in moe.values()) / len(moe),
                "moe_expert_fractions": {i: [round(f, 4) for f in m.expert_fractions.tolist()]
                                         for i, m in moe.items()}}

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """Append max_new_tokens sampled tokens to idx (B, T). temperature 0 is greedy.

        The context is the last block_size tokens. With the KV cache, when the window is full the cache
        is rebuilt from the last block_size/2 tokens, so long generations stay cheap.
        """
        cfg = self.config
        caches, pos = None, 0
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -cfg.block_size:])
            else:
                if caches is None or pos >= cfg.block_size:
                    context = idx[:, -(cfg.block_size // 2 if caches else cfg.block_size):]
                    caches = [KVCache(idx.shape[0], cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head,
                                      idx.device, self.tok_emb.weight.dtype) for _ in self.blocks]
                    logits, _ = self(context, caches=caches, start=0)
                    pos = context.shape[1]
                else:
                    logits, _ = self(idx[:, -1:], caches=caches, start=pos, prefix=idx[:, -pos - 1:-1])
                    pos += 1
            idx = torch.cat([idx, sample_next(logits[:, -1, :].float(), temperature, top_k)], dim=1)
        return idx

    # ---- accounting -------------------------------------------------------------------------------
    def param_counts(self):
        """Total parameters, and parameters active per token: each feed-forward block says how many of
        its own (and of the value rows it reads) a token uses; an untied input embedding counts one row."""
        cfg = self.config
        tables = sum(len(t.weight) * t.v_dim for t in self.values)  # whole, also where a rank holds a column shard
        held = {id(p) for _, p in self.value_parameters()}
        total = sum(p.numel() for p in self.parameters() if id(p) not in held) + tables
        ffn_total = sum(p.numel() for block in self.blocks for p in block.ffn.parameters()) + tables
        ffn_active = sum(block.ffn.active_params() for block in self.blocks)
        embedding = 0 if cfg.tie_embeddings else self.tok_emb.weight.numel() - cfg.n_embd
        return {"total": total, "active": total - ffn_total + ffn_active - embedding}

    def flops_per_token(self):
        """Forward FLOPs per token: 2 per multiply-add, attention over a full block_size context (PaLM)."""
        cfg = self.config
        attention = 2 * 4 * cfg.n_embd ** 2 + 2 * 2 * cfg.block_size * cfg.n_embd
        return 2 * cfg.vocab_size * cfg.n_embd + sum(attention + b.ffn.flops_per_token() for b in self.blocks)

    # ---- optimisation -----------------------------------------------------------------------------
    VALUE_GROUP = "values"  # the name of the value tables' optimizer group

    def value_parameters(self):
        """(name, parameter) of every value table, in table order: the one answer to "which parameters are
        the memory's values", asked by the optimizer groups, clipping, gradient averaging, DDP and
        checkpoints alike."""
        tables = {id(p) for p in self.values.parameters()}
        return [(name, p) for name, p in self.named_parameters() if id(p) in tables]

    def no_decay_parameters(self):
        """Parameters that weight decay would only pull towards zero for no gain, by role: biases and the
        gains of normalisations (RMSNorm weights, the memory layers' qk-norm query gain)."""
        return [p for module in self.modules() for name, p in module.named_parameters(recurse=False)
                if isinstance(module, nn.RMSNorm) or name == "bias" or name.endswith("_gain")]

    def optimizer_groups(self, weight_decay, learning_rate, value_lr):
        """AdamW groups: weights (decayed), biases and norm gains (not decayed), value tables (their own peak lr).

        Each group carries its name and peak lr, so the schedule scales every group alike and the value
        table can be clipped on its own.
        """
        values = [p for _, p in self.value_parameters()]
        no_decay = {id(p) for p in self.no_decay_parameters()}
        others = [p for p in self.parameters() if p.requires_grad and id(p) not in {id(v) for v in values}]
        groups = [
            {"name": "decay", "params": [p for p in others if id(p) not in no_decay],
             "weight_decay": weight_decay, "peak_lr": learning_rate},
            {"name": "no_decay", "params": [p for p in others if id(p) in no_decay],
             "weight_decay": 0.0, "peak_lr": learning_rate},
            {"name": self.VALUE_GROUP, "params": [p for p in values if p.requires_grad], "weight_decay": weight_decay,
             "peak_lr": value_lr},
        ]
        for g in groups:
            g["lr"] = g["peak_lr"]
        return [g for g in groups if g["params"]]


def sample_next(logits, temperature, top_k):
    """One token per row from logits (B, vocab): greedy at temperature 0, else top-k softmax sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
