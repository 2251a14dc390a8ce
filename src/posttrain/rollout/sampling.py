"""One sampling step: last-position logits in, next tokens and their logprobs out."""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.rollout.base import SamplingParams


def truncate_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set every logit outside the top-k / top-p (nucleus) set to -inf; returns a new tensor.

    top-k keeps the k largest logits (ties with the k-th are kept). top-p then keeps the smallest
    prefix of tokens, by decreasing probability, whose probability reaches top_p: token i stays
    when the mass strictly before it is < top_p, so the most likely token always stays.

    Shapes: logits [B, V] -> [B, V].
    """
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sample_next(logits: Tensor, params: SamplingParams,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Draw one token per row and return (tokens [B], logprobs [B]).

    logprob = z[token] - logsumexp(z),  z = logits / temperature, over the full vocabulary:
    the same expression `algos.token_logprobs` evaluates when the trainer recomputes it, so the
    two agree to rounding. top-k / top-p only shape the distribution the token is drawn from.
    Greedy (temperature 0) takes the argmax and reports logprobs under temperature 1.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # a bf16 logsumexp loses ~3 digits, as in token_logprobs
    temperature = params.logprob_temperature
    scaled = logits if temperature == 1.0 else logits / temperature
    if params.greedy:
        tokens = scaled.argmax(dim=-1)
    else:
        probs = torch.softmax(truncate_logits(scaled, params.top_k, params.top_p), dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    picked = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, picked - torch.logsumexp(scaled, dim=-1)
