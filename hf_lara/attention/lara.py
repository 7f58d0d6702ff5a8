"""`lara`: linear randomized attention (Zheng, Wang, Kong, ICML 2022), bidirectional, plus our causal variant.

Notation (arXiv 2204.04667 §3-4; `hf_lara/attention/README.md`, Notation and LARA): tilde space `x~ = x * scale**0.5`, `xi(x, w) = exp(w.x~ - |x~|^2 / 2)`, and
`xi(mu, w) = N(w; mu, I) / N(w; 0, I)` for a proposal mean `mu` already in tilde space. Softmax attention is
`E_{p_n}[f_n(w)]` with target `p_n(w) ∝ N(w; 0, I) xi(q_n, w) Z_n(w)`, `Z_n(w) = sum_m xi(k_m, w)` and
`f_n(w) = sum_m xi(k_m, w) v_m / Z_n(w)` (sums over the keys query `n` sees). LARA estimates it by
self-normalised multiple importance sampling with `C` Gaussian proposals `N(mu_c, I)`, one sample `w_c` each:

    out_n = sum_c softmax_c(log w_nc) f_n(w_c),    w_nc = alpha_nc p_n(w_c) / q_c(w_c).

**Bidirectional (the paper).** `f_n(w_c) = f_c` and `Z_n = Z_c` do not depend on `n`. The proposals come from
`C_eff = min(num_landmarks, N)` segments of the `N` real tokens, segment `c` = positions
`[floor(c N / C_eff), floor((c + 1) N / C_eff))`; the segment means `q̄_c`, `k̄_c` (tilde space, optionally mapped by
the `adaptive` `Linear(D, D)` layers, which commute with averaging) give `mu_c = q̄_c + k̄_c`. Training draws
`w_c = mu_c + eps_c`, `eps_c ~ N(0, I)` in tilde space, one per (batch, head, proposal); eval uses `w_c = mu_c`.
With `lq_nc = log xi(q_n, w_c)`, `log Z_c = logsumexp_m log xi(k_m, w_c)` and the `C x C` proposal log-densities
`L_cc' = log xi(mu_c', w_c) = w_c.mu_c' - |mu_c'|^2 / 2`:

* `mis="opt"`: `log w_nc = log alpha_nc + lq_nc + log Z_c - L_cc` with `alpha_nc = max(BH_c + λ (t_nc - mean_c' t_nc'),
  1e-8)`, balance heuristic `BH_c = exp(L_cc) / sum_c' exp(L_cc')`, `t_nc = softmax_n(q̄_c.q~_n)` (over queries, as
  in the official code) and `λ = alpha_coeff`;
* `mis="bh"`: `alpha = 1` and the deterministic mixture density: `log w_nc = lq_nc + log Z_c - logsumexp_c' L_cc'`.

The segments are anchored at the first real token, so this path runs on unpadded groups (`packs_padding`) and
segment means never average padding. Cost `O(N C D + C^2 D)`; no `N x N` tensor.

**Causal (ours; the paper has none).** Data-dependent proposals cannot be both causal and linear. Segment means over
the whole sequence leak the future into every query's weights. Means over each query's own prefix are causal, but then
`mu`, `w`, `f_n(w_c)` and `Z_n(w_c)` differ for every query: `N x C` statistics, each a fresh pass over the keys, i.e.
quadratic cost. We therefore use `C = num_landmarks` *data-independent* proposals: a learned parameter `proposal_mean`
`(H, C, D)` (init 0) and a persistent buffer `proposal_noise` `(H, C, D)` (orthogonal Gaussian), `w_c = proposal_mean_c
+ proposal_noise_c` (fixed, so eval is deterministic and a saved model reproduces; `redraw=True` draws fresh noise at
every training forward). With `f_n(w_c)` and `Z_n(w_c)` restricted to keys `m <= n`, `w_nc f_n(w_c) = sum_{m<=n}
phi_q(n)_c phi_k(m)_c v_m` and `sum_c w_nc = sum_{m<=n} phi_q(n).phi_k(m)`, so the SNIS estimate is *exactly* causal
kernel attention with

    lk_mc = log xi(k_m, w_c),
    lq_nc = log alpha_nc + log xi(q_n, w_c) - log xi(mu_c, w_c)       # "opt"; "bh" uses -logsumexp_c' L_cc'

Here `-log xi(mu_c, w_c) = -|w_c|^2/2 + |w_c - mu_c|^2/2` is the ratio `N(0, I) / N(mu_c, I)` and `t_nc =
softmax_c(q~_n.mu_c)` is normalised over *proposals* (over queries it would see the future). It runs in linear time
through `causal_linear_attention` (padding and `Nq < Nk` decoding included). At init (`mu = 0`) `BH_c = 1/C`, `t` is
uniform and `alpha = 1/C` cancels: causal LARA is exactly RFA with the `C` orthogonal features `proposal_noise`.

**What is trained.** `proposal_mean` `(H, C, D)` in both modes: the causal proposals' means, and bidirectionally a
learned offset added to the data-dependent means, `mu_c = q̄_c + k̄_c + proposal_mean_c` (first `C_eff` rows; any
proposal means give a valid MIS estimate, and at init, 0, the paper's estimator is unchanged). With `adaptive=True`
also the bidirectional maps `adapt_q`, `adapt_k`. Every `lara` module holds `proposal_mean` and `proposal_noise`
whatever the mode it will run in (plus the adaptive maps), so saving and loading are uniform; the bidirectional path
never reads `proposal_noise` and the causal path never reads the adaptive maps, which then get no gradient (DDP needs
`find_unused_parameters=True` with `adaptive=True`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LOG2E, AttentionEstimator, check_choice, check_float, check_int, records_grad, register_estimator
from .linear import (
    DEFAULT_CHUNK_SIZE,
    FeatureMaps,
    LinearState,
    _normalise,
    absorb_keys,
    bidirectional_block_elements,
    block_length,
    half_squared_norm,
    kernel_attention,
    writes_into,
)
from .random_features import orthogonal_gaussian, positive_random_log_features
from .recurrent import RecurrentStateMixin
from .window import WindowMaps

MIS_TYPES = ("opt", "bh")
_ALPHA_FLOOR = 1e-8
#: the inference path of bidirectional LARA runs when one head's `(N, 2C)` logits hold at most this many elements
INFERENCE_ELEMENTS = 1 << 21
#: and takes as many heads at a time as fit this many logits (at least one)
GROUP_ELEMENTS = 1 << 19


def segment_means(x: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Means of `x` `(b, H, N, D)` over the segments `[floor(c N / C), floor((c + 1) N / C))` -> `(b, H, C, D)`.

    Position `p` lies in segment `ceil((p + 1) C / N) - 1`. Equal segments (`C` divides `N`) are a reshape and a
    mean; otherwise the rows are summed into their segments by one `index_add` (`O(N D)`, no `(C, N)` matrix).
    """
    N = x.shape[2]
    if N % num_segments == 0:
        return x.unflatten(2, (num_segments, N // num_segments)).mean(3)
    positions = torch.arange(N, device=x.device)
    segment = torch.div((positions + 1) * num_segments + N - 1, N, rounding_mode="floor") - 1
    counts = torch.bincount(segment, minlength=num_segments).to(x.dtype)[:, None]  # (C, 1)
    sums = x.new_zeros(*x.shape[:2], num_segments, x.shape[3]).index_add(2, segment, x)
    return sums / counts


def proposal_log_density(omega: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """`L[c, c'] = log xi(mu_c', w_c) = log N(w_c; mu_c', I) - log N(w_c; 0, I)`, shape `(..., C, C)`."""
    return omega @ mu.transpose(-1, -2) - 0.5 * (mu * mu).sum(-1)[..., None, :]


def log_alpha(log_density: torch.Tensor, t: torch.Tensor, alpha_coeff: float) -> torch.Tensor:
    """`log max(BH_c + λ (t_nc - mean_c t_nc), 1e-8)` `(..., N, C)` for `L` `(..., C, C)` and `t` `(..., N, C)`."""
    own = torch.diagonal(log_density, dim1=-2, dim2=-1)
    balance = torch.exp(own - torch.logsumexp(log_density, dim=-1))[..., None, :]  # (..., 1, C)
    alpha = balance + alpha_coeff * (t - t.mean(dim=-1, keepdim=True))
    return torch.log(alpha.clamp_min(_ALPHA_FLOOR))


def _log_alpha_in_place(log_density: torch.Tensor, logits2: torch.Tensor, alpha_coeff: float) -> torch.Tensor:
    """`log_alpha` with `t = softmax(logits, -1)`, without autograd, in place on the fresh base-2 logits
    `logits2 = logits log2 e` `(..., N, C)`.

    `t` sums to 1 over the `C` proposals, so its mean is `1 / C`: `alpha = lambda t + (BH - lambda / C)`, with the
    softmax normaliser and `lambda` applied as one factor.
    """
    own = torch.diagonal(log_density, dim1=-2, dim2=-1)
    balance = torch.exp(own - torch.logsumexp(log_density, dim=-1))[..., None, :]  # (..., 1, C)
    num_proposals = logits2.shape[-1]
    e = logits2.sub_(logits2.amax(dim=-1, keepdim=True)).exp2_()
    e = e.mul_(alpha_coeff / e.sum(dim=-1, keepdim=True))
    return e.add_(balance - alpha_coeff / num_proposals).clamp_min_(_ALPHA_FLOOR).log_()


def log_inverse_proposal(log_density: torch.Tensor, mis: str) -> torch.Tensor:
    """`-log q_c(w_c)` relative to `N(0, I)`: own proposal ("opt") or the equal-weight mixture ("bh"), `(..., C)`."""
    if mis == "opt":
        return -torch.diagonal(log_density, dim1=-2, dim2=-1)
    return -torch.logsumexp(log_density, dim=-1)


def _affine(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` in the dtype of `x` (fp64 tests run fp32 layers)."""
    return F.linear(x, layer.weight.to(x.dtype), layer.bias.to(x.dtype))


@register_estimator("lara")
class LinearRandomizedAttention(RecurrentStateMixin, AttentionEstimator):
    """Linear randomized attention; bidirectional as in the paper, causal with learned data-independent proposals.

    Args:
        num_heads (`int`): number of heads `H`.
        head_dim (`int`): head dimension `D`.
        num_landmarks (`int`, *optional*, defaults to 64): proposals `C` (segments when bidirectional).
        mis (`str`, *optional*, defaults to `"opt"`): multiple-importance weights, `"opt"` (balance heuristic plus
            query-specific correction) or `"bh"` (deterministic mixture).
        alpha_coeff (`float`, *optional*, defaults to 1.0): `λ` >= 0 of the `"opt"` correction (2.0 in the paper's
            ImageNet runs).
        adaptive (`bool`, *optional*, defaults to `False`): map the segment means through `Linear(D, D)` layers
            `adapt_q`, `adapt_k` (shared across heads, initialised to the identity). Bidirectional only.
        redraw (`bool`, *optional*, defaults to `False`): causal only; fresh `proposal_noise` at every training pass.
        chunk_size (`int`, *optional*, defaults to 64): chunk length of the causal path.
        window_size (`int`, *optional*, defaults to 0): `W > 0` attends exactly (softmax) to the `W` nearest keys
            (causal: the last `W`, itself included) and through LARA to the others, under one normaliser
            (`window.py`). LARA is kernel attention with `phi_q(n)_c = alpha_nc xi(q_n, w_c) / q_c(w_c)` and
            `phi_k(m)_c = xi(k_m, w_c)` (relative to `N(0, I)`), whose product is a multiple-importance estimate of
            `exp(scale q.k)`: both parts share a scale with no extra parameter. 0 = LARA only.
        sink_tokens (`int`, *optional*, defaults to 0): with a window, the first `G` real tokens (bidirectional:
            and the last `G`, e.g. `[CLS]` and `[SEP]`) are attended exactly by every query, as attention sinks
            (StreamingLLM, arXiv 2309.17453); they never enter the estimator. Decoding keeps them in the state.

    >>> attn = LinearRandomizedAttention(num_heads=2, head_dim=16, num_landmarks=8)
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_landmarks: int = 64,
        mis: str = "opt",
        alpha_coeff: float = 1.0,
        adaptive: bool = False,
        redraw: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        window_size: int | None = 0,
        sink_tokens: int | None = 0,
    ) -> None:
        super().__init__(num_heads, head_dim)
        self.num_landmarks = check_int("num_landmarks", num_landmarks)
        self._check_window(window_size, sink_tokens)
        self.mis = check_choice("mis", mis, MIS_TYPES)
        self.alpha_coeff = check_float("alpha_coeff", alpha_coeff, minimum=0.0)
        self.chunk_size = check_int("chunk_size", chunk_size)
        if not isinstance(adaptive, bool):
            raise TypeError(f"`adaptive` must be True or False, got {adaptive!r}.")
        self.adaptive = adaptive
        if not isinstance(redraw, bool):
            raise TypeError(f"`redraw` must be True or False, got {redraw!r}.")
        self.redraw = redraw
        self.adapt_q = self._identity_map() if self.adaptive else None
        self.adapt_k = self._identity_map() if self.adaptive else None
        self.proposal_mean = nn.Parameter(torch.zeros(num_heads, num_landmarks, head_dim))
        self.register_buffer("proposal_noise", self.draw_noise(), persistent=True)

    def _identity_map(self) -> nn.Linear:
        layer = nn.Linear(self.head_dim, self.head_dim)
        with torch.no_grad():
            layer.weight.copy_(torch.eye(self.head_dim))
            layer.bias.zero_()
        return layer

    def draw_noise(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh `(H, C, D)` orthogonal Gaussian draw for the causal proposals."""
        return orthogonal_gaussian(self.num_heads, self.num_landmarks, self.head_dim, generator=generator)

    def landmarks(self, q_t: torch.Tensor, k_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment means `q̄`, `k̄` `(b, H, C_eff, D)` of tilde-space `q_t`, `k_t` `(b, H, N, D)`, adapted if asked."""
        num_segments = min(self.num_landmarks, q_t.shape[2])
        q_bar, k_bar = segment_means(q_t, num_segments), segment_means(k_t, num_segments)
        if self.adaptive:
            q_bar, k_bar = _affine(self.adapt_q, q_bar), _affine(self.adapt_k, k_bar)
        return q_bar, k_bar

    def proposals(
        self, q: torch.Tensor, k: torch.Tensor, scale: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tilde-space `q̄`, `mu = q̄ + k̄ + proposal_mean[:C_eff]` and the samples `omega` `(b, H, C_eff, D)` of raw `q`, `k` `(b, H, N, D)`.

        Segment means commute with the scaling, so they are taken on the raw inputs and scaled afterwards (no
        `(b, H, N, D)` tilde copy). Training draws `noise ~ N(0, I)` when not given; eval uses none.
        """
        root = scale**0.5
        num_segments = min(self.num_landmarks, q.shape[2])
        q_bar, k_bar = segment_means(q, num_segments) * root, segment_means(k, num_segments) * root
        if self.adaptive:
            q_bar, k_bar = _affine(self.adapt_q, q_bar), _affine(self.adapt_k, k_bar)
        # the learned offset `proposal_mean` (init 0) gives bidirectional LARA something to train by default
        mu = q_bar + k_bar + self.proposal_mean[:, :num_segments].to(q_bar.dtype)
        if noise is None and self.training:
            noise = torch.randn_like(mu)
        omega = mu if noise is None else mu + noise.to(mu.dtype)
        return q_bar, mu, omega

    def bidirectional(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        noise: torch.Tensor | None = None,
        block_size: int | None = None,
    ) -> torch.Tensor:
        """Bidirectional LARA `softmax(log w, -1) @ f` on unpadded `(b, H, N, D)` inputs, blocked over tokens.

        Same estimate as `mixture` without any `(b, H, N, C)` tensor built whole:

        * keys: one pass of `absorb_keys` (`linear.py`, the key loop of every linear path; running per-proposal
          max `s_c`) gives
          `kvz_c = sum_m exp(lk_mc - s_c) [v_m, 1]`, i.e. `log Z_c = s_c + log kvz_c[-1]` and `f_c = kvz_c[:-1] /
          kvz_c[-1]`;
        * `"opt"` only: the same routine over the queries without values gives the column logsumexp `l_c` of
          `q~ q̄^T`, so that `t_nc = exp(q~_n.q̄_c - l_c)`;
        * queries: per block, one GEMM `q [omega, q̄]^T` gives `lq` (without the per-query `-|q~|^2 / 2`, which
          cancels) and the `t` logits; `p_nc = exp(lq_nc + s_c - log q_c(w_c) - max_c) * alpha_nc` and
          `out_n = (p_n kv) / (p_n z)`, which equals `softmax_c(log w_nc) f_c` (the `log Z_c - s_c = log z_c` part
          comes in through `z`; `alpha` multiplies instead of going through `log`).

        Without autograd, with `block_size` None and `N 2C <= INFERENCE_ELEMENTS`, `_bidirectional_inference` runs
        instead (whole sequence per head group, every logit computed once).

        Args:
            noise (`torch.Tensor` of shape `(b, H, C_eff, D)`, *optional*): as in `mixture`.
            block_size (`int`, *optional*): tokens per block (default: about `bidirectional_block_elements() /
                (b H 2C)`).
        """
        b, H, N, D = q.shape
        q_bar, mu, omega = self.proposals(q, k, scale, noise)
        C = omega.shape[2]
        root = scale**0.5
        tracked = (q, k, v, q_bar, mu, omega)
        if block_size is None and N * 2 * C <= INFERENCE_ELEMENTS and not records_grad(*tracked):
            return self._bidirectional_inference(q, k, v, q_bar, mu, omega, scale)
        if block_size is None:
            block_size = max(bidirectional_block_elements() // (b * H * max(2 * C, D + 1)), 1)
        block = block_length(b * H, max(2 * C, D + 1), block_size=block_size)
        w_omega = (omega * root).transpose(-1, -2)  # (b, H, D, C)

        def key_map(x: torch.Tensor) -> torch.Tensor:  # lk_mc = log xi(k_m, w_c)
            return torch.matmul(x, w_omega).sub_(0.5 * scale * x.square().sum(dim=-1, keepdim=True))

        # keys: kvz_c = sum_m exp(lk_mc - s_c) [v_m, 1] with the running max s_c, the shared key-absorption loop
        empty = LinearState.empty(b, H, C, v)
        kvz, shift = absorb_keys(empty.kvz, empty.shift, k, v, None, key_map, block)  # (b, H, C, D + 1)
        log_density = proposal_log_density(omega, mu)  # (b, H, C, C)
        bias = shift[:, :, None, :] + log_inverse_proposal(log_density, self.mis)[:, :, None, :]  # (b, H, 1, C)
        opt = self.mis == "opt"
        weight = w_omega
        if opt:
            w_t = (q_bar * root).transpose(-1, -2)  # (b, H, D, C): logits q~ q̄^T = q (root q̄)^T
            # column logsumexp over queries of the t logits: the same loop with counts only (no values)
            counts, t_max = absorb_keys(q.new_zeros(b, H, C, 1), empty.shift, q, None, None, lambda x: x @ w_t, block)
            log_t_norm = (t_max + torch.log(counts[..., 0]))[:, :, None, :]  # (b, H, 1, C)
            own = torch.diagonal(log_density, dim1=-2, dim2=-1)
            balance = torch.exp(own - torch.logsumexp(log_density, dim=-1))[:, :, None, :]  # (b, H, 1, C)
            weight = torch.cat([w_omega, w_t], dim=-1)  # (b, H, D, 2C)
            bias = torch.cat([bias, -log_t_norm], dim=-1)  # (b, H, 1, 2C)
        grad = records_grad(q, kvz, weight, bias)
        out = None if grad else q.new_empty(b, H, N, D)
        outs = []
        flat_bias, flat_weight, flat_kvz = bias.flatten(0, 1), weight.flatten(0, 1), kvz.flatten(0, 1)
        for start, q_b in zip(range(0, N, block), q.split(block, dim=2)):
            # log w (shifted by s_c) and, for "opt", the t logits minus their logsumexp over queries: one GEMM
            proj = torch.baddbmm(flat_bias, q_b.flatten(0, 1), flat_weight)
            log_w = proj[..., :C]
            top = log_w.detach().amax(dim=-1, keepdim=True)
            p = torch.exp(log_w - top) if grad else log_w.sub_(top).exp_()
            if opt:
                # alpha = max(BH_c + lambda (t_nc - mean_c t_nc), 1e-8), multiplied into p instead of added in log
                if grad:
                    t = torch.exp(proj[..., C:])
                    alpha = torch.add(balance.flatten(0, 1), t - t.mean(dim=-1, keepdim=True), alpha=self.alpha_coeff)
                    p = p * alpha.clamp_min(_ALPHA_FLOOR)
                else:
                    t = proj[..., C:].exp_()
                    t_mean = t.mean(dim=-1, keepdim=True).mul_(self.alpha_coeff)
                    alpha = t.mul_(self.alpha_coeff).sub_(t_mean).add_(balance.flatten(0, 1)).clamp_min_(_ALPHA_FLOOR)
                    p = p.mul_(alpha)
            num_den = (p @ flat_kvz).unflatten(0, (b, H))
            if grad:
                outs.append(_normalise(num_den))
            else:
                torch.div(num_den[..., :-1], num_den[..., -1:], out=out[:, :, start : start + q_b.shape[2]])
        if not grad:
            return out
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _bidirectional_inference(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_bar: torch.Tensor,
        mu: torch.Tensor,
        omega: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """`bidirectional` without autograd, a few heads at a time on reused scratch buffers.

        Every logit is computed once, in base 2 (weights and biases times `log2 e`, then `exp2_` in place): per
        head, `lk = k [root omega]^T - scale |k|^2 / 2` `(N, C)` gives `f_c` and `log Z_c`, and one GEMM
        `q [root omega, root q̄]^T` `(N, 2C)` gives `lq` and, for `"opt"`, the `t` logits, whose softmax over the
        queries is taken in place. The output is written into a `(b, N, H, D)` buffer (the layout the head merge
        wants) and returned as its `(b, H, N, D)` view.

        Args:
            q, k, v (`torch.Tensor` of shape `(b, H, N, D)`): raw unpadded inputs.
            q_bar, mu, omega (`torch.Tensor` of shape `(b, H, C, D)`): as returned by `proposals`.

        Returns:
            `torch.Tensor` of shape `(b, H, N, D)` (a view of a `(b, N, H, D)` tensor).
        """
        b, H, N, D = q.shape
        C = omega.shape[2]
        opt = self.mis == "opt"
        width = 2 * C if opt else C
        root2 = scale**0.5 * LOG2E
        log_density = proposal_log_density(omega, mu)  # (b, H, C, C)
        weight = torch.cat([omega, q_bar], dim=2) if opt else omega  # (b, H, width, D)
        weight = (weight * root2).transpose(-1, -2)  # (b, H, D, width), base-2 logits
        log2_inverse = log_inverse_proposal(log_density, self.mis) * LOG2E  # (b, H, C)
        if opt:
            own = torch.diagonal(log_density, dim1=-2, dim2=-1)
            balance = torch.exp(own - torch.logsumexp(log_density, dim=-1))  # (b, H, C)
        half_norm = 0.5 * scale * LOG2E
        group = max(1, min(H, GROUP_ELEMENTS // (N * width)))
        scratch = q.new_empty(group * N * width)
        part = q.new_empty(group * N * D)  # squared keys
        out = q.new_empty(b, N, H, D)
        for i in range(b):
            for h0 in range(0, H, group):
                h1 = min(H, h0 + group)
                g = h1 - h0
                w_g = weight[i, h0:h1]
                # keys: lk = log2 xi(k_m, w_c), shifted by its max over the keys s_c, exponentiated in place
                k_g = k[i, h0:h1]
                lk = torch.bmm(k_g, w_g[..., :C], out=scratch[: g * N * C].view(g, N, C))
                lk.sub_(torch.mul(k_g, k_g, out=part[: g * N * D].view(g, N, D)).sum(-1, keepdim=True).mul_(half_norm))
                shift = lk.amax(dim=1, keepdim=True)  # (g, 1, C)
                z = lk.sub_(shift).exp2_().sum(dim=1)  # (g, C)
                f = torch.bmm(lk.transpose(1, 2), v[i, h0:h1]).div_(z[..., None])  # (g, C, D)
                # queries: log2 w_nc = lq_nc + log2 Z_c - log2 q_c(w_c) (+ log2 alpha_nc, multiplied in below)
                bias = (shift[:, 0] + z.log2() + log2_inverse[i, h0:h1])[:, None]  # (g, 1, C)
                proj = torch.bmm(q[i, h0:h1], w_g, out=scratch[: g * N * width].view(g, N, width))
                log_w = proj[..., :C].add_(bias)
                p = log_w.sub_(log_w.amax(dim=-1, keepdim=True)).exp2_()
                if opt:
                    # t_nc = softmax over queries of q~_n.q̄_c; alpha = max(BH_c + lambda (t_nc - mean_c t), 1e-8)
                    t = proj[..., C:]
                    t = t.sub_(t.amax(dim=1, keepdim=True)).exp2_()
                    t.div_(t.sum(dim=1, keepdim=True))
                    t.sub_(t.mean(dim=-1, keepdim=True)).mul_(self.alpha_coeff)
                    p.mul_(t.add_(balance[i, h0:h1, None]).clamp_min_(_ALPHA_FLOOR))
                p.div_(p.sum(dim=-1, keepdim=True))
                for j in range(g):  # straight into the (N, D) rows of head h0 + j, leading dimension H D
                    torch.mm(p[j], f[j], out=out[i, :, h0 + j])
        return out.transpose(1, 2)

    def mixture(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bidirectional LARA on unpadded `q`, `k`, `v` `(b, H, N, D)`.

        Args:
            noise (`torch.Tensor` of shape `(b, H, C_eff, D)`, *optional*): the tilde-space `eps_c`; drawn from
                `N(0, I)` in training and zero in eval when not given.

        Returns:
            The unnormalised log weights `log w` `(b, H, N, C_eff)` and the proposal values `f` `(b, H, C_eff, D)`;
            the output is `softmax(log w, -1) @ f`.
        """
        q_t, k_t = q * scale**0.5, k * scale**0.5
        q_bar, mu, omega = self.proposals(q, k, scale, noise)
        lq = positive_random_log_features(q_t, omega)  # (b, H, N, C)
        lk = positive_random_log_features(k_t, omega)  # (b, H, N, C)
        log_z = torch.logsumexp(lk, dim=2)  # (b, H, C)
        # softmax over keys from the one logsumexp (a strided softmax over dim 2 would redo the reduction)
        f = torch.exp(lk - log_z[:, :, None, :]).transpose(-1, -2) @ v  # (b, H, C, D)
        log_density = proposal_log_density(omega, mu)  # (b, H, C, C)
        log_w = lq + (log_z + log_inverse_proposal(log_density, self.mis))[:, :, None, :]
        if self.mis == "opt":
            t = torch.softmax(q_t @ q_bar.transpose(-1, -2), dim=2)  # normalised over queries
            log_w = log_w + log_alpha(log_density, t, self.alpha_coeff)
        return log_w, f

    def feature_maps(self, scale: float, dtype: torch.dtype, noise: torch.Tensor | None = None) -> FeatureMaps:
        """Block-wise causal log-feature maps of raw queries and keys `(B, H, n, D) -> (B, H, n, C)`.

        The query map leaves out the per-query `-|q~|^2 / 2` (it cancels in the normalised output).
        """
        root = scale**0.5
        mu = self.proposal_mean.to(dtype)  # (H, C, D)
        noise = self.proposal_noise if noise is None else noise
        omega = mu + noise.to(dtype)
        log_density = proposal_log_density(omega, mu)  # (H, C, C)
        weight = (omega * root).transpose(-1, -2)  # (H, D, C)
        query_bias = log_inverse_proposal(log_density, self.mis)[:, None, :]  # (H, 1, C)
        if self.mis == "opt":
            mu_t = (mu * root).transpose(-1, -2)
            mu_t2 = mu_t * LOG2E  # base-2 logits for the no-grad path

        @writes_into
        def query_map(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
            lq = torch.matmul(x, weight, out=out).add_(query_bias)
            if self.mis == "opt":
                if records_grad(lq, x, mu_t):  # t = softmax over proposals: stays causal
                    return lq + log_alpha(log_density, torch.softmax(x @ mu_t, dim=-1), self.alpha_coeff)
                lq.add_(_log_alpha_in_place(log_density, x @ mu_t2, self.alpha_coeff))
            return lq

        @writes_into
        def key_map(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
            return torch.matmul(x, weight, out=out).sub_(half_squared_norm(x, scale))

        return FeatureMaps(query_map, key_map, self.num_landmarks)

    def window_maps(self, scale: float, dtype: torch.dtype, noise: torch.Tensor | None = None) -> WindowMaps:
        """Causal complete log-features: `feature_maps` with the query's `-|q~|^2 / 2` put back."""
        maps = self.feature_maps(scale, dtype, noise)

        def query_map(x: torch.Tensor) -> torch.Tensor:
            return maps.query(x).sub_(0.5 * scale * x.square().sum(dim=-1, keepdim=True))

        return WindowMaps(query_map, maps.key, maps.num_features)

    def bidirectional_window_maps(
        self, q: torch.Tensor, k: torch.Tensor, scale: float, noise: torch.Tensor | None = None
    ) -> WindowMaps:
        """Complete log-features of bidirectional LARA on unpadded `(b, H, N, D)` inputs (proposals from `q`, `k`).

        `lk_mc = log xi(k_m, w_c)` and `lq_nc = log alpha_nc + log xi(q_n, w_c) - log q_c(w_c)`, the kernel form of
        `mixture` (`sum_c softmax_c(log w_nc) f_c` with `f_c`, `Z_c` expanded); `t` is normalised over all queries.
        """
        root = scale**0.5
        q_bar, mu, omega = self.proposals(q, k, scale, noise)
        weight = (omega * root).transpose(-1, -2)  # (b, H, D, C)
        log_density = proposal_log_density(omega, mu)  # (b, H, C, C)
        bias = log_inverse_proposal(log_density, self.mis)[:, :, None, :]  # (b, H, 1, C)
        w_t = (q_bar * root).transpose(-1, -2)
        log_t_norm = torch.logsumexp(q @ w_t, dim=2, keepdim=True) if self.mis == "opt" else None

        def key_map(x: torch.Tensor) -> torch.Tensor:
            return torch.matmul(x, weight).sub_(0.5 * scale * x.square().sum(dim=-1, keepdim=True))

        def query_map(x: torch.Tensor) -> torch.Tensor:
            lq = key_map(x) + bias
            if log_t_norm is not None:
                t = torch.exp(x @ w_t - log_t_norm)  # softmax over queries, as in `mixture`
                lq = lq + log_alpha(log_density, t, self.alpha_coeff)
            return lq

        return WindowMaps(query_map, key_map, omega.shape[2])

    def current_noise(self, device: torch.device) -> torch.Tensor:
        """The causal proposal noise of this pass: a fresh draw when training with `redraw`, else the buffer."""
        return self.draw_noise().to(device) if (self.training and self.redraw) else self.proposal_noise

    def attend_causal(self, q, k, v, key_mask, scale):
        if self.window_size:
            maps = self.window_maps(scale, q.dtype, self.current_noise(q.device))
            return self.attend_windowed(q, k, v, key_mask, True, scale, maps)
        maps = self.feature_maps(scale, q.dtype, self.current_noise(q.device))
        return kernel_attention(q, k, v, key_mask, True, maps, self.chunk_size)

    def attend_unpadded(self, q, k, v, causal, scale):
        if self.window_size:
            return self.attend_windowed(q, k, v, None, False, scale, self.bidirectional_window_maps(q, k, scale))
        return self.bidirectional(q, k, v, scale)

    def attend_left_aligned(self, q, k, v, lengths, causal, scale):
        if causal or self.window_size:
            return super().attend_left_aligned(q, k, v, lengths, causal, scale)
        return self.aligned_mixture(q, k, v, lengths, scale)

    def aligned_mixture(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Bidirectional LARA of rows holding `lengths[b]` real tokens first, with static shapes (for tracing).

        The estimate of `mixture` on each row's real tokens, with `C = num_landmarks` proposals of which the first
        `C_eff = min(C, n)` are used (the others masked): segment `c` holds the real positions `p` with
        `ceil((p + 1) C_eff / n) - 1 = c`, so segments, means and `t` (over real queries) are those of the packed
        path. Memory `O(N C)` per (batch, head) through a `(B, N, C)` segment matrix; no `N x N` tensor.

        Args:
            q, k, v (`torch.Tensor` of shape `(B, H, N, D)`): left-aligned raw inputs.
            lengths (`torch.LongTensor` of shape `(B,)`): real tokens per row, `1 <= lengths <= N`.

        Returns:
            `torch.Tensor` of shape `(B, H, N, D)`; rows past `lengths` are not meaningful.
        """
        B, H, N, D = q.shape
        C, root = self.num_landmarks, scale**0.5
        pos = torch.arange(N, device=q.device)
        n = lengths[:, None]  # (B, 1)
        real = pos < n  # (B, N)
        used = torch.clamp(n, max=C)
        segment = torch.div((pos + 1) * used + n - 1, n, rounding_mode="floor") - 1  # (B, N)
        member = (segment[..., None] == torch.arange(C, device=q.device)) & real[..., None]  # (B, N, C)
        counts = member.sum(1)  # (B, C)
        valid = (counts > 0)[:, None, None, :]  # (B, 1, 1, C)
        average = member.to(q.dtype) / counts.clamp_min(1)[:, None, :].to(q.dtype)
        q_bar, k_bar = (torch.einsum("bnc,bhnd->bhcd", average, x) * root for x in (q, k))
        if self.adaptive:
            q_bar, k_bar = _affine(self.adapt_q, q_bar), _affine(self.adapt_k, k_bar)
        mu = q_bar + k_bar + self.proposal_mean.to(q_bar.dtype)
        omega = mu + torch.randn_like(mu) if self.training else mu
        q_t, k_t = q * root, k * root
        lq = positive_random_log_features(q_t, omega)  # (B, H, N, C)
        lk = positive_random_log_features(k_t, omega).masked_fill(~real[:, None, :, None], float("-inf"))
        log_z = torch.logsumexp(lk, dim=2)  # (B, H, C)
        f = torch.exp(lk - log_z[:, :, None, :]).transpose(-1, -2) @ v  # (B, H, C, D)
        log_density = proposal_log_density(omega, mu).masked_fill(~valid, float("-inf"))  # unused columns out
        own = torch.diagonal(log_density, dim1=-2, dim2=-1)  # (B, H, C), finite for the used proposals
        inverse = -own if self.mis == "opt" else -torch.logsumexp(log_density, dim=-1)
        log_w = lq + (log_z + inverse)[:, :, None, :]
        if self.mis == "opt":
            logits = (q_t @ q_bar.transpose(-1, -2)).masked_fill(~real[:, None, :, None], float("-inf"))
            t = torch.softmax(logits, dim=2)  # over the real queries
            t_mean = (t * valid).sum(-1, keepdim=True) / used[:, None, None, :].to(t.dtype)
            balance = torch.exp(own - torch.logsumexp(log_density, dim=-1))[:, :, None, :]
            log_w = log_w + torch.log((balance + self.alpha_coeff * (t - t_mean)).clamp_min(_ALPHA_FLOOR))
        return torch.softmax(log_w.masked_fill(~valid, float("-inf")), dim=-1) @ f

    def packs_padding(self, causal: bool) -> bool:
        # causal proposals ignore the data, so padding is masked in place rather than packed away
        return not causal

    def attend(self, q, k, v, key_mask, causal, scale):
        return self.attend_causal(q, k, v, key_mask, scale)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_landmarks={self.num_landmarks}, mis={self.mis!r}, "
            f"alpha_coeff={self.alpha_coeff}, adaptive={self.adaptive}, window_size={self.window_size}, sink_tokens={self.sink_tokens}"
        )
