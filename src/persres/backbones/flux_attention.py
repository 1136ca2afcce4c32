"""LAG on Flux: the joint attention's text-column probabilities, and where a block's mask applies.

Flux (MMDiT) has no cross-attention: a double-stream block (``FluxTransformerBlock``) projects text and
image tokens with separate weights and attends over the joint sequence [text, image] with one softmax;
a single-stream block (``FluxSingleTransformerBlock``) holds [text, image] as one sequence. SDPA returns
no probabilities, and the full (text + image)^2 map is far too large to materialise (4608^2 per head
at 1024 px with 512 T5 positions), so ``FluxCaptureProcessor`` computes the output exactly as
diffusers' ``FluxAttnProcessor`` does and, beside it, for the image queries only, the probabilities of
the few text key columns LAG reads (V* and the class word):

    P[q, j] = exp(q . k_j s - logsumexp_l(q . k_l s)),  s = 1 / sqrt(head_dim), l over ALL keys [text, image]

in fp32, over chunks of queries so that at most ``chunk_elements`` scores exist at once. It hands them
to the LAG hook as (B, heads, HW, K) with the K column indices (``keys``); core's ``lag`` sums the
columns of V* and the class word per concept, averages heads, and thresholds at the median as for a
U-Net. Each block's maps come from its own attention layer (``attention_layers``), which runs before
the block's residual layer: a double block's ``attn.to_out.0`` is called inside the processor, after
the capture; a single block's ``proj_out`` after its attention.

Where the mask applies (``residual_mask``): a double block's ``attn.to_out.0`` sees the image stream
only, (B, HW, C): the mask as it is. A single block's ``proj_out`` sees [text, image], (B, T + HW, C):
the text tokens have no place in the picture, so they follow the concept as a whole: each concept's
residual acts on them when its mask in that block is not empty, and not at all when it is
(``image_tokens`` says which positions are image). Training, normal sampling, ``merge`` and the LoRA
exports apply a single block's residual to every token it sees, text included, so this is what makes
LAG with every mask 1 equal normal sampling and with every mask 0 the base model, exactly; leaving the
text tokens always untouched would make LAG differ from normal sampling even where the concept fills
the picture.

What the Flux backbone calls (its protocol methods are one line each):
- ``attention_layers(denoiser, target)`` -> ``attention_layers(denoiser, target)`` below;
- ``capture_processor(hook, keys, text_length)`` -> ``FluxCaptureProcessor(hook, keys, text_length)``;
- ``residual_mask(denoiser, target, mask, text_length)`` -> ``residual_mask(...)`` below.
``text_length`` is the T of the prompt plan's columns, which must be the T5 sequence length the
pipeline runs at (``max_sequence_length``, 512 by default): the columns are located in the T5 ids
padded to it, since the joint sequence holds the T5 tokens first. The processor refuses a double block
whose text length differs. An attention mask (diffusers' Flux pipeline passes none) is refused while
capturing. The processors use diffusers' default attention backend (as a fresh ``FluxAttnProcessor``).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttention,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
    _get_qkv_projections,
)
from torch import nn

from persres.backbones import ProbsHook
from persres.errors import ModelError

CHUNK_ELEMENTS = 1 << 24  # scores held at once while capturing: 64 MiB in fp32


class FluxCaptureProcessor:
    """``FluxAttnProcessor``'s computation (double and single blocks), plus the joint-softmax
    probabilities of the image queries to the text positions ``keys``, handed to ``hook``."""

    _attention_backend = None  # as a fresh FluxAttnProcessor: diffusers' default backend
    _parallel_config = None

    def __init__(
        self, hook: ProbsHook, keys: torch.Tensor, text_length: int, chunk_elements: int = CHUNK_ELEMENTS
    ) -> None:
        if keys.numel() and int(keys.max()) >= text_length:
            raise ValueError(f"text columns {keys.tolist()} reach past the {text_length} text positions")
        self.hook = hook
        self.keys = keys
        self.text_length = text_length
        self.chunk_elements = chunk_elements

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("localized sampling on Flux reads the joint attention without an attention mask")
        single = encoder_hidden_states is None  # a single block's sequence is [text, image]
        text = self.text_length if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        if text != self.text_length or (single and hidden_states.shape[1] <= text):
            raise ValueError(
                f"the prompt plan's token columns cover {self.text_length} text positions but this attention "
                f"reads {text} of {hidden_states.shape[1]}: locate the words in the T5 ids padded to the "
                "pipeline's max_sequence_length (512 by default)"
            )
        # the same operations as FluxAttnProcessor (diffusers 0.42), the capture before the output projection
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # (B, L, heads, D)
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)  # [text, image]
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=None,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)  # (B, L, heads * D)
        # the mask of this block is set here, before its residual layer (to_out.0 below, or proj_out)
        self.hook(joint_columns(query, key, self.keys, text, self.chunk_elements), self.keys)
        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text, hidden_states.shape[1] - text], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))  # linear, dropout
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


def joint_columns(
    query: torch.Tensor,
    key: torch.Tensor,
    keys: torch.Tensor,
    first: int,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Probabilities (B, heads, L - first, K) that the queries from position ``first`` on give the key
    columns ``keys`` under the softmax over all L keys, as SDPA scales them (1 / sqrt(D)); ``query`` and
    ``key`` (B, L, heads, D) as the attention sees them (rotated). In fp32, in chunks of queries."""
    q = query[:, first:].transpose(1, 2).float()  # (B, heads, Q, D)
    k = key.transpose(1, 2).float()  # (B, heads, L, D)
    batch, heads, length, depth = k.shape
    if not keys.numel():
        return q.new_zeros(batch, heads, q.shape[2], 0)
    columns = keys.to(k.device)
    rows = max(1, chunk_elements // (batch * heads * length))
    parts = []
    for start in range(0, q.shape[2], rows):
        scores = q[:, :, start : start + rows] @ k.transpose(-1, -2) * depth**-0.5  # (B, heads, rows, L)
        parts.append((scores[..., columns] - scores.logsumexp(dim=-1, keepdim=True)).exp())
    return torch.cat(parts, dim=2)  # (B, heads, Q, K)


def flux_block(
    denoiser: nn.Module, path: str
) -> tuple[str, FluxTransformerBlock | FluxSingleTransformerBlock]:
    """The Flux block (double or single stream) holding the module at ``path``, with its path; found by
    type, walking up the path."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        module = denoiser.get_submodule(prefix)
        if isinstance(module, FluxTransformerBlock | FluxSingleTransformerBlock):
            return prefix, module
    raise ModelError(f"{path} is not inside a Flux transformer block of {type(denoiser).__name__}")


def attention_layers(denoiser: nn.Module, target: str) -> dict[str, FluxAttention]:
    """The attention layer whose maps place the residual at ``target``: its own block's ``attn``, which
    runs before it."""
    prefix, block = flux_block(denoiser, target)
    return {f"{prefix}.attn": block.attn}


def image_tokens(denoiser: nn.Module, target: str, text_length: int) -> slice:
    """Which of the tokens the residual layer at ``target`` sees are image tokens: all of them for a
    double block's ``attn.to_out.0`` (the image stream), those after the T text tokens for a single
    block's ``proj_out`` ([text, image]). Another layer is refused: what it sees is not known here."""
    _, block = flux_block(denoiser, target)
    layer = denoiser.get_submodule(target)
    if isinstance(block, FluxTransformerBlock) and layer is block.attn.to_out[0]:
        return slice(0, None)
    if isinstance(block, FluxSingleTransformerBlock) and layer is block.proj_out:
        return slice(text_length, None)
    raise ModelError(
        f"{target} is neither a double block's attn.to_out.0 nor a single block's proj_out; "
        "localized sampling on Flux places residuals on those two only"
    )


def residual_mask(denoiser: nn.Module, target: str, mask: torch.Tensor, text_length: int) -> torch.Tensor:
    """The block's mask (B, groups, HW) over the tokens the layer at ``target`` sees: on a single block's
    T leading text tokens, 1 for each concept whose mask is not empty and 0 for one whose mask is (see
    the module's notes)."""
    leading = image_tokens(denoiser, target, text_length).start or 0
    if not leading:
        return mask  # (B, groups, HW)
    present = mask.amax(dim=-1, keepdim=True)  # (B, groups, 1)
    return torch.cat([present.expand(*mask.shape[:-1], leading), mask], dim=-1)  # (B, groups, T + HW)
