"""The StableLM transformer and its heads.

Module attribute names are the checkpoint's weight names, so loading is a strict state-dict load.

    sequential (default)                      parallel residual (StableLM 2 12B)
    x = x + attn(ln1(x))                      h = ln1(x)
    x = x + mlp(ln2(x))                       x = x + attn(h) + mlp(h)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .cache import KVCache
from ..layers.fused import Fused
from .config import StableLmConfig
from .pretrained import PreTrainedModel

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


# -- outputs -------------------------------------------------------------------------------------
@dataclass
class BaseModelOutput:
    last_hidden_state: torch.Tensor  # (B, S, H)
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None

    @property
    def cache(self) -> KVCache | None:  # the name transformers 5.x uses
        return self.past_key_values


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, S or logits_to_keep, V), model dtype
    loss: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None

    @property
    def cache(self) -> KVCache | None:
        return self.past_key_values


@dataclass
class SequenceClassifierOutput(CausalLMOutput):
    """logits (B, num_labels), pooled at the last non-pad token."""


@dataclass
class TokenClassifierOutput:
    logits: torch.Tensor  # (B, S, num_labels)
    loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


# -- rotary embeddings ---------------------------------------------------------------------------
class RotaryEmbedding:
    """cos/sin tables for the first `rotary_dim` dims of each head (NeoX split-half convention)."""

    def __init__(self, config: StableLmConfig):
        self.config = config
        self.rotary_dim = config.rotary_dim
        self.inv_freq = self._inv_freq(config.rope_theta)
        if config.rope_type == "linear":
            self.inv_freq /= config.rope_scaling["factor"]
        self._on_device: dict[torch.device, torch.Tensor] = {}  # copies, so decode steps copy nothing

    def _inv_freq(self, base) -> torch.Tensor:
        r = self.rotary_dim
        # Always built on the CPU, also while the model is built on the meta device.
        return 1.0 / (base ** (torch.arange(0, r, 2, dtype=torch.int64, device="cpu").float() / r))

    def __call__(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, S) -> cos, sin (B, S, rotary_dim) in `dtype`."""
        device = position_ids.device
        if device not in self._on_device:
            self._on_device[device] = self.inv_freq.to(device)
        inv_freq = self._on_device[device]
        config = self.config
        if config.rope_type == "dynamic":
            seq_len = torch.max(position_ids).cpu() + 1
            if seq_len > config.max_position_embeddings:
                r, factor = self.rotary_dim, config.rope_scaling["factor"]
                base = config.rope_theta * (
                    (factor * seq_len / config.max_position_embeddings) - (factor - 1)) ** (r / (r - 2))
                inv_freq = self._inv_freq(base).to(device)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, D); cos/sin (B, S, r): rotate the first r dims of every head."""
    r = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


# -- attention -----------------------------------------------------------------------------------
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
           implementation: str, dropout: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention, the single place where the backend is chosen.

    q (B, H, S, D); k, v (B, H_kv, T, D); mask (B, 1, S, T) bool, True = may attend.
    Returns (B, H, S, D).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    if implementation == "flash_attention_2" and mask is None and q.is_cuda:
        from flash_attn import flash_attn_func

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout,
                              softmax_scale=scale, causal=is_causal)
        return out.transpose(1, 2)
    if implementation == "eager":
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * scale
        if is_causal:
            s, t = q.shape[2], k.shape[2]
            mask = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(probs, p=dropout, training=dropout > 0)
        return torch.matmul(probs, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                                          scale=scale, enable_gqa=k.shape[1] != q.shape[1])


class PerHeadLayerNorm(nn.Module):
    """An independent LayerNorm(head_dim, bias=False) per head; weights stored as `norms.{h}.weight`."""

    def __init__(self, head_dim: int, num_heads: int, eps: float):
        super().__init__()
        self.eps = eps
        self.norms = nn.ModuleList(nn.LayerNorm(head_dim, eps=eps, bias=False) for _ in range(num_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, S, D): one fused norm over D, then each head's own scale, rounded once."""
        weight = torch.stack([norm.weight for norm in self.norms])[None, :, None, :]  # (1, H, 1, D)
        normed = F.layer_norm(x.float(), x.shape[-1:], eps=self.eps) * weight.float()
        return normed.to(x.dtype)


class StableLmAttention(nn.Module):
    def __init__(self, config: StableLmConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.attention_dropout = config.attention_dropout
        self.attn_implementation = "sdpa"
        h, d = config.hidden_size, config.head_dim
        bias = config.use_qkv_bias
        # One module, one matmul in the inference layout (see stablelm.layers.fused for the names).
        self.qkv_proj = Fused(q_proj=nn.Linear(h, self.num_heads * d, bias=bias),
                              k_proj=nn.Linear(h, self.num_kv_heads * d, bias=bias),
                              v_proj=nn.Linear(h, self.num_kv_heads * d, bias=bias))
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        if config.qk_layernorm:
            self.q_layernorm = PerHeadLayerNorm(d, self.num_heads, config.layer_norm_eps)
            self.k_layernorm = PerHeadLayerNorm(d, self.num_kv_heads, config.layer_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv_proj(x)
        one_token = cache is not None and not cache.paged and cache.one_token and not self.training
        if one_token and not hasattr(self, "q_layernorm"):  # rotary, slot write and attention in one native call
            out = cache.attend_one(self.layer_idx, q, k, v, cos, sin)
            if out is not None:
                return self.o_proj(out)
        q = q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, S, D)
        k = k.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_layernorm"):
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        # q and k rotate as one tensor: the same numbers, half the small ops (decoding is dominated by them)
        q, k = apply_rotary(torch.cat((q, k), dim=1), cos, sin).split((self.num_heads, self.num_kv_heads), dim=1)
        if cache is not None and cache.paged:  # the serving engine's block pool attends itself
            out = cache.attend(self.layer_idx, q, k, v, self.attn_implementation)
            return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))
        if one_token:  # q and k normed and rotated above: the kernel writes the slot and attends
            out = cache.attend_one(self.layer_idx, q, k, v)
            if out is not None:
                return self.o_proj(out)
        if cache is not None:
            k, v = cache.write(self.layer_idx, k, v)
        dropout = self.attention_dropout if self.training else 0.0
        out = attend(q, k, v, mask, is_causal, self.attn_implementation, dropout)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class StableLmMLP(nn.Module):
    def __init__(self, config: StableLmConfig):
        super().__init__()
        h, inter = config.hidden_size, config.intermediate_size
        self.gate_up_proj = Fused(gate_proj=nn.Linear(h, inter, bias=False), up_proj=nn.Linear(h, inter, bias=False))
        self.down_proj = nn.Linear(inter, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class StableLmDecoderLayer(nn.Module):
    def __init__(self, config: StableLmConfig, layer_idx: int):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.self_attn = StableLmAttention(config, layer_idx)
        self.mlp = StableLmMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if not config.use_parallel_residual:
            self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    tp = None  # the tensor-parallel group (stablelm.models.parallel) when o_proj / down_proj hold partial sums

    def forward(self, x, cos, sin, cache, mask, is_causal):
        h = self.input_layernorm(x)
        attn = self.self_attn(h, cos, sin, cache, mask, is_causal)
        if self.tp is not None:  # one all-reduce per block, one per layer with the parallel residual
            if self.use_parallel_residual:
                return x + self.tp.reduce(attn + self.mlp(h))
            x = x + self.tp.reduce(attn)
            return x + self.tp.reduce(self.mlp(self.post_attention_layernorm(x)))
        if self.use_parallel_residual:
            return x + attn + self.dropout(self.mlp(h))
        x = x + attn
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


# -- the backbone --------------------------------------------------------------------------------
class StableLmModel(PreTrainedModel):
    """Embeddings, decoder layers and the final LayerNorm; returns BaseModelOutput."""

    base_prefix = ""

    def __init__(self, config: StableLmConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(StableLmDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.gradient_checkpointing, self.checkpoint_kwargs = False, {"use_reentrant": False}

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool = False, cache: KVCache | None = None) -> BaseModelOutput:
        """input_ids (B, S) or inputs_embeds (B, S, H); attention_mask (B, past + S), 1 = real token.

        position_ids default to past_len + arange(S) per row, as in the reference. With a cache
        (`past_key_values`, or a new one when use_cache) the new keys/values are appended to it.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            check_ids(input_ids, self.config.vocab_size)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s = x.shape[:2]
        cache = past_key_values if past_key_values is not None else cache
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if cache is None and use_cache:
            cache = KVCache.for_model(self, b, s)
        if attention_mask is not None and attention_mask.shape[0] != b:
            raise ValueError(f"attention_mask has batch size {attention_mask.shape[0]}, inputs have {b}")

        paged = cache is not None and cache.paged
        if paged:  # (1, T): the serving engine's scheduled sequences side by side; it knows their positions
            position_ids, mask, is_causal = cache.positions, None, False
        elif cache is not None:
            if cache.batch_size != b:
                raise ValueError(f"the cache holds {cache.batch_size} rows, inputs have {b}")
            past = cache.get_seq_length() if cache.aligned else None
            query_slots = cache.reserve(s, attention_mask)  # (B, S)
            key_valid = cache.key_mask() if cache.has_holes else None
            aligned = cache.aligned
        else:
            past, aligned = 0, True
            query_slots = torch.arange(s, device=x.device)[None]
            key_valid = None
            if attention_mask is not None and not bool(attention_mask.all()):
                key_valid = attention_mask.bool()
        if not paged:
            if position_ids is None:
                position_ids = query_slots.expand(b, s)
            mask, is_causal = _attention_mask(query_slots, key_valid, past if aligned else None, s)

        cos, sin = self.rotary(position_ids, x.dtype)
        hidden_states = [x] if output_hidden_states else None
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, cache, mask, is_causal,
                                                      **self.checkpoint_kwargs)
            else:
                x = layer(x, cos, sin, cache, mask, is_causal)
            if output_hidden_states:
                hidden_states.append(x)
        x = self.norm(x)
        if output_hidden_states:
            hidden_states[-1] = x
        return BaseModelOutput(x, cache, tuple(hidden_states) if output_hidden_states else None)

    def set_attn_implementation(self, implementation: str) -> None:
        if implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {implementation!r}")
        if implementation == "flash_attention_2":
            try:
                import flash_attn  # noqa: F401
            except ImportError:
                raise ValueError("attn_implementation='flash_attention_2' needs the flash-attn package") from None
            if not torch.cuda.is_available():
                raise ValueError("attn_implementation='flash_attention_2' needs a CUDA device")
        for layer in self.layers:
            layer.self_attn.attn_implementation = implementation


def check_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """ValueError for input_ids that cannot be embedded: empty, not integers, or outside the vocabulary."""
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be (batch, sequence) with at least one token, got shape "
                         f"{tuple(input_ids.shape)}")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    low, high = input_ids.aminmax()
    if low < 0 or high >= vocab_size:
        bad = int(low) if low < 0 else int(high)
        raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary (vocab_size {vocab_size})")


def _attention_mask(query_slots: torch.Tensor, key_valid: torch.Tensor | None, past: int | None,
                    num_new: int) -> tuple[torch.Tensor | None, bool]:
    """The mask for one forward: (mask (B, 1, S, T) or None, is_causal).

    Query i of row b sits in slot query_slots[b, i] and may see slots <= its own that hold real
    tokens. A padding query at the left edge sees nothing: SDPA gives it zeros, as in the reference.
    """
    if key_valid is None and past is not None:
        if num_new == 1:
            return None, False
        if past == 0:
            return None, True
    t = int(query_slots.max()) + 1 if key_valid is None else key_valid.shape[1]
    key_slots = torch.arange(t, device=query_slots.device)
    allowed = key_slots <= query_slots[..., None]  # (B, S, T)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    return allowed[:, None], False


# -- heads ---------------------------------------------------------------------------------------
class StableLmForCausalLM(PreTrainedModel):
    """The backbone and a language-model head (tied to embed_tokens iff tie_word_embeddings)."""

    base_prefix = "model."
    head_keys = ("lm_head.weight",)

    def __init__(self, config: StableLmConfig):
        super().__init__(config)
        self.model = StableLmModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int = 0,
                output_hidden_states: bool = False, cache=None) -> CausalLMOutput:
        """labels (B, S): next-token targets before the shift, -100 = ignored.

        logits_to_keep: compute logits only for the last k positions (0 = all), or for the positions a 1-D
        index tensor names.
        """
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_hidden_states, cache)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        elif logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        if self.tp is not None:  # each rank computed its vocabulary rows
            logits = self.tp.gather(logits, self.config.vocab_size)
        loss = None
        if labels is not None:
            shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].to(logits.device)
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100)
        return CausalLMOutput(logits, loss, out.past_key_values, out.hidden_states)

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        """Generate tokens; see `stablelm.generation.generate` for the options."""
        from ..generation.generate import generate

        return generate(self, input_ids, attention_mask, **kwargs)


class StableLmForSequenceClassification(PreTrainedModel):
    """Scores the rightmost non-pad token: logits (B, num_labels)."""

    base_prefix = "model."
    head_keys = ("score.weight",)

    def __init__(self, config: StableLmConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = StableLmModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states: bool = False,
                cache=None) -> SequenceClassifierOutput:
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_hidden_states, cache)
        logits = self.score(out.last_hidden_state)
        batch = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None and batch != 1:
            raise ValueError("cannot pool a batch of more than one sequence without config.pad_token_id")
        if pad is None or input_ids is None:
            last = torch.full((batch,), -1, device=logits.device)
        else:
            # The rightmost token that is not padding: works with left and right padding.
            not_pad = (input_ids != pad).to(logits.device, torch.int32)
            last = (torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32) * not_pad).argmax(-1)
        pooled = logits[torch.arange(batch, device=logits.device), last]
        loss = None if labels is None else self._loss(pooled, labels.to(pooled.device))
        return SequenceClassifierOutput(pooled, loss, out.past_key_values, out.hidden_states)

    def _loss(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        problem = self.config.problem_type
        if problem is None:
            if self.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            if self.num_labels == 1:
                return F.mse_loss(pooled.squeeze(), labels.squeeze())
            return F.mse_loss(pooled, labels)
        if problem == "single_label_classification":
            return F.cross_entropy(pooled.view(-1, self.num_labels), labels.view(-1), ignore_index=-100)
        if problem == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(pooled, labels)
        raise ValueError(f"config.problem_type {problem!r} is not one of regression, "
                         "single_label_classification, multi_label_classification")


class StableLmForTokenClassification(PreTrainedModel):
    """A label per token: logits (B, S, num_labels)."""

    base_prefix = "model."
    head_keys = ("score.weight", "score.bias")

    def __init__(self, config: StableLmConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = StableLmModel(config)
        if config.classifier_dropout is not None:
            p = config.classifier_dropout
        else:
            p = config.hidden_dropout if config.hidden_dropout is not None else 0.1
        self.dropout = nn.Dropout(p)
        self.score = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states: bool = False,
                cache=None) -> TokenClassifierOutput:
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_hidden_states, cache)
        logits = self.score(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, self.num_labels), labels.view(-1).to(logits.device),
                                   ignore_index=-100)
        return TokenClassifierOutput(logits, loss, out.hidden_states)
