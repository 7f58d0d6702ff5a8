"""hf_lara against the official HKUNLP modules (github.com/HKUNLP/efficient-attention), same shapes, same inputs.

The official code is *not* part of this repository: point `--official_path` (or `HF_LARA_OFFICIAL_PATH`) at an
exported copy of its `efficient-attention` folder (the one holding the `efficient_attention` package), e.g.

    git clone https://github.com/HKUNLP/efficient-attention /tmp/hkunlp
    python benchmarks/bench_official.py --official_path /tmp/hkunlp/efficient-attention

Without it the script prints one line and exits 0. Missing optional packages of the official code (`einops`,
`timm`) are replaced in this process only by small stand-ins (`_install_shims`).

Each official module is driven on the attention core: its input projections return the same `q`, `k`, `v`
`(B, H, N, D)` that ours receives, its output projection is the identity, and both sides end with the same
`(B, N, H D)` head merge. Configurations are mapped so that both compute the same estimator where one exists:

* `rfa` (bidirectional): `KernelizedAttention(proj_method="favorp", approx_attn_dim=S)` in eval mode, its
  `eval_proj` copied into our `projection`. Theirs adds `eps = 1e-4` to every feature and clamps the normaliser
  at `1e-2`; the agreement check (max |diff|) runs it without both (the same estimator, fp32 rounding), the
  timing and `err official` use the module as shipped.
* `lara` (bidirectional): `LinearRA(proposal_gen="no-param-pool", mis_type="mis-opt")` in eval mode, ours with
  `mis="opt"` and the same number of landmarks (equal segments when `C` divides `N`): the same estimator, outputs
  equal up to fp32 rounding.
* `eva` (bidirectional) and causal `eva` (`EVA`, `CausalEVAttention(adaptive_proj="no-ln", chunk_size=P)`): the
  estimators differ by design (the official chunks overlap the local window, ours count every token once and
  weigh summaries by their size; `hf_lara/attention/eva.py`), so max |diff| between them is not a check; the
  table also gives each side's relative error against exact softmax (`err`). The official bidirectional EVA
  gives each chunk summary the weight of one key (no `log` of the chunk length in its logit), hence its large `err`.

Timing: fp32, `--threads` threads, no autograd (`torch.inference_mode`); `--warmup` calls of each side first (the
allocator warmed on both), then `--reps` rounds alternating which side goes first; best time per side (the
`speed-up` column) and the ratio of the medians (`median speed-up`).
`fresh MB` is the memory each side newly maps during one more call after the timing (minor page faults times the
page size, `getrusage`; Linux/Unix only, `nan` elsewhere): large temporaries that the allocator hands back to the
system after every call show up there, reused buffers do not.
Results: `benchmarks/results/official.md` and `official.json` (`--out` to change), with the 1-minute load average
before and after the run (on a shared machine timings are only comparable between the two sides of one row).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
import types
from argparse import Namespace
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hf_lara.attention import build_attention

B, H, D = 1, 12, 64
NOTES = (
    "Timings: best of `reps` alternating calls (`median speed-up`: ratio of the medians), no autograd; on a "
    "shared machine compare the two sides of one row only. `fresh MB`: pages first touched during one more call "
    "(minor faults x page size). EVA rows compare "
    "different estimators by design: the official chunks overlap the local window (tokens counted twice), ours "
    "count every token once; `err` is each side's relative error against exact softmax. Official rfa's `err` is "
    "that of the module as shipped: its `eps = 1e-4` feature offset pulls towards uniform weights, which lowers the "
    "error on these near-uniform random inputs (without it both sides have the same error, e.g. 0.740 at 4k). The "
    "official bidirectional EVA weighs each chunk summary like a single key whatever the chunk's length, so its "
    "output is dominated by the local window (output norm 4.2x the exact one at 4k): `err` > 1 there."
)
RESULTS = Path(__file__).resolve().parent / "results"
ENV_VAR = "HF_LARA_OFFICIAL_PATH"
CASES = (("rfa", False), ("lara", False), ("eva", False), ("eva", True))
NUM_FEATURES = 64  # rfa features, lara landmarks, bidirectional eva chunks
WINDOW, CHUNK = 64, 16  # eva window, causal eva chunk size


# ---------------------------------------------------------------------------------------------------------------
# loading the official package (shims for optional dependencies, in this process only)
# ---------------------------------------------------------------------------------------------------------------


def _rearrange(x: torch.Tensor, pattern: str, **sizes: int) -> torch.Tensor:
    """A stand-in for `einops.rearrange` covering the patterns of the official modules (names, groups, `...`, 1)."""

    def parse(side: str) -> list:
        tokens, group = [], None
        for word in side.replace("(", " ( ").replace(")", " ) ").split():
            if word == "(":
                group = []
            elif word == ")":
                tokens.append(tuple(group))
                group = None
            elif group is not None:
                group.append(word)
            else:
                tokens.append(word)
        return tokens

    left, right = (parse(side) for side in pattern.split("->"))
    rest = x.dim() - (len(left) - left.count("..."))
    shape, names, known = [], [], dict(sizes)
    dims = iter(x.shape)
    for token in left:
        if token == "...":
            ellipsis = [next(dims) for _ in range(rest)]
            shape += ellipsis
            names += [("...", i) for i in range(rest)]
        elif isinstance(token, tuple):
            size = next(dims)
            missing = [n for n in token if n not in known]
            for n in missing:
                known[n] = size // math.prod(known[m] for m in token if m in known)
            shape += [known[n] for n in token]
            names += list(token)
        else:
            size = next(dims)
            if token != "1":
                known[token] = size
                shape.append(size)
                names.append(token)
    x = x.reshape(shape)
    flat = []
    for token in right:
        if token == "...":
            flat += [("...", i) for i in range(rest)]
        elif isinstance(token, tuple):
            flat += list(token)
        elif token != "1":
            flat.append(token)
    x = x.permute([names.index(n) for n in flat])
    out_shape, dims = [], iter(x.shape)
    for token in right:
        if token == "...":
            out_shape += [next(dims) for _ in range(rest)]
        elif isinstance(token, tuple):
            out_shape.append(math.prod(next(dims) for _ in token))
        elif token == "1":
            out_shape.append(1)
        else:
            out_shape.append(next(dims))
    return x.reshape(out_shape)


def _install_shims() -> list[str]:
    """Register stand-ins for `einops` and `timm` when they are not installed; returns the names shimmed."""
    shimmed = []
    try:
        importlib.import_module("einops")
    except ImportError:
        einops = types.ModuleType("einops")
        einops.rearrange = _rearrange
        einops.repeat = None  # imported by the official attn_utils, never called on the paths benchmarked
        sys.modules["einops"] = einops
        shimmed.append("einops")
    try:
        importlib.import_module("timm.models.layers")
    except ImportError:
        timm, models, layers = (types.ModuleType(n) for n in ("timm", "timm.models", "timm.models.layers"))
        layers.trunc_normal_ = nn.init.trunc_normal_
        timm.models, models.layers = models, layers
        sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})
        shimmed.append("timm")
    return shimmed


def resolve_official_path(path: str | None) -> Path | None:
    """The folder holding the `efficient_attention` package, from the argument or the environment; None if absent."""
    path = path or os.environ.get(ENV_VAR)
    if not path:
        return None
    root = Path(path).expanduser()
    for candidate in (root, root / "efficient-attention"):
        if (candidate / "efficient_attention" / "__init__.py").is_file():
            return candidate
    return None


def load_official(root: Path) -> types.ModuleType:
    """Import the official `efficient_attention` package from `root` (shims installed first)."""
    _install_shims()
    sys.path.insert(0, str(root))
    return importlib.import_module("efficient_attention")


# ---------------------------------------------------------------------------------------------------------------
# driving both sides on the same q, k, v
# ---------------------------------------------------------------------------------------------------------------


def _merge(out: torch.Tensor) -> torch.Tensor:
    """`(B, H, N, D)` -> `(B, N, H D)`, the head merge both sides end with."""
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def _fixed(value: object) -> Callable[..., object]:
    return lambda *args, **kwargs: value


class _Fixed(nn.Module):
    """A stand-in projection returning a given tensor whatever its input."""

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__()
        self.tensor = tensor

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.tensor


def _identity_maps(module: nn.Module) -> None:
    """Set the official adaptive `Linear(D, D)` maps to the identity, as ours start (plain chunk means)."""
    with torch.no_grad():
        for name in ("adaptive_mu_q", "adaptive_mu_k"):
            layer = getattr(module, name)[0]
            layer.weight.copy_(torch.eye(layer.weight.shape[0]))
            layer.bias.zero_()


def build_pair(
    ea: types.ModuleType, method: str, causal: bool, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor], bool]:
    """Closures running the official module and ours on `q`, `k`, `v`, both returning `(B, N, H D)`.

    Returns:
        `(official, ours, same_estimator)`.
    """
    b, h, n, d = q.shape
    c = h * d
    x = q.new_zeros(b, n, c)  # the official forwards read shapes from `x`; the projections return q, k, v
    if method == "rfa":
        theirs = ea.KernelizedAttention(approx_attn_dim=NUM_FEATURES, proj_method="favorp", dim=c, num_heads=h).eval()
        ours = build_attention("rfa", num_heads=h, head_dim=d, num_features=NUM_FEATURES).eval()
        ours.projection.copy_(theirs.eval_proj)
        return (lambda: _merge(theirs._apply_attention(q, k, v))), (lambda: _merge(ours(q, k, v))), True
    if method == "lara":
        theirs = ea.LinearRA(
            num_landmarks=NUM_FEATURES, proposal_gen="no-param-pool", mis_type="mis-opt", dim=c, num_heads=h
        ).eval()
        theirs.proj_and_split_heads, theirs.proj = _fixed((q, k, v)), nn.Identity()
        ours = build_attention("lara", num_heads=h, head_dim=d, num_landmarks=NUM_FEATURES, mis="opt").eval()
        return (lambda: theirs(x)), (lambda: _merge(ours(q, k, v))), True
    if method == "eva" and not causal:
        theirs = ea.EVA(
            adaptive_proj="no-ln", num_landmarks=NUM_FEATURES, window_size=WINDOW, dim=c, num_heads=h
        ).eval()
        theirs.proj_and_split_heads, theirs.proj = _fixed((q, k, v)), nn.Identity()
        _identity_maps(theirs)
        ours = build_attention("eva", num_heads=h, head_dim=d, window_size=WINDOW, num_chunks=NUM_FEATURES).eval()
        return (lambda: theirs(x)), (lambda: _merge(ours(q, k, v))), False
    if method == "eva":
        args = Namespace(
            adaptive_proj="no-ln", num_chunks=None, chunk_size=CHUNK, causal=True, use_t5_rpe=False,
            window_size=WINDOW, overlap_window=False,
        )  # fmt: skip
        theirs = ea.CausalEVAttention(embed_dim=c, num_heads=h, self_attention=True, attn_args=args).eval()
        theirs.q_proj, theirs.k_proj, theirs.v_proj = (_Fixed(_merge(t)) for t in (q, k, v))
        _identity_maps(theirs)
        theirs.out_proj = nn.Identity()
        xt = x.transpose(0, 1)  # fairseq layout (T, B, C)
        ours = build_attention("eva", num_heads=h, head_dim=d, window_size=WINDOW, chunk_size=CHUNK).eval()
        return (lambda: theirs(xt, xt, xt)[0].transpose(0, 1)), (lambda: _merge(ours(q, k, v, causal=True))), False
    raise ValueError(f"Unknown case {method!r} (causal={causal}); valid: {CASES}.")


@contextlib.contextmanager
def _without_stabilisers(ea: types.ModuleType, method: str) -> Iterator[None]:
    """For the agreement check: the official FAVOR+ without its `eps = 1e-4` feature offset and `1e-2` clamp."""
    if method != "rfa":
        yield
        return
    module = importlib.import_module(f"{ea.__name__}.kernelized_attention")
    projection, defaults = module.favorp_projection, module.linear_attention.__defaults__
    module.favorp_projection = functools.partial(projection, eps=0.0)
    module.linear_attention.__defaults__ = (torch.finfo(torch.float32).tiny,)
    try:
        yield
    finally:
        module.favorp_projection, module.linear_attention.__defaults__ = projection, defaults


def relative_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return float((out - exact).norm() / exact.norm())


def time_pair(fns: Sequence[Callable[[], torch.Tensor]], warmup: int, reps: int) -> list[list[float]]:
    """Wall times (s) of each function: `warmup` calls each, then `reps` rounds in alternating order."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(reps):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            start = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - start)
    return times


def fresh_memory_mb(fn: Callable[[], torch.Tensor]) -> float:
    """MiB of fresh pages touched by one call of `fn` (minor page faults x page size); `nan` without `resource`."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not Unix
        return math.nan
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    return (after - before) * resource.getpagesize() / 2**20


def measure(ea: types.ModuleType, method: str, causal: bool, n: int, warmup: int, reps: int, seed: int = 0) -> dict:
    """One table row: times, speed-up, max |diff| and each side's relative error against exact softmax."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=gen) * 0.5 for _ in range(3))
    official, ours, same = build_pair(ea, method, causal, q, k, v)
    with torch.inference_mode():
        exact = _merge(F.scaled_dot_product_attention(q, k, v, is_causal=causal))
        out_official, out_ours = official(), ours()
        with _without_stabilisers(ea, method):
            diff = float((official() - out_ours).abs().max())
        times_official, times_ours = time_pair([official, ours], warmup, reps)
        fresh_official, fresh_ours = fresh_memory_mb(official), fresh_memory_mb(ours)
    return {
        "method": method,
        "causal": causal,
        "N": n,
        "official_ms": 1e3 * min(times_official),
        "ours_ms": 1e3 * min(times_ours),
        "speedup": min(times_official) / min(times_ours),
        "speedup_median": statistics.median(times_official) / statistics.median(times_ours),
        "max_abs_diff": diff,
        "same_estimator": same,
        "err_official": relative_error(out_official, exact),
        "err_ours": relative_error(out_ours, exact),
        "fresh_mb_official": fresh_official,
        "fresh_mb_ours": fresh_ours,
    }


# ---------------------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------------------


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table: method, N, causal, official ms, ours ms, speed-up, max |diff|, errors vs softmax, fresh MB."""
    lines = [
        "| method | N | causal | official ms | ours ms | speed-up | median speed-up | max abs diff | err official "
        "| err ours | fresh MB official | fresh MB ours |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        diff = f"{r['max_abs_diff']:.2e}" + ("" if r["same_estimator"] else " (other estimator)")
        lines.append(
            f"| {r['method']} | {r['N']} | {'yes' if r['causal'] else 'no'} | {r['official_ms']:.1f} | "
            f"{r['ours_ms']:.1f} | {r['speedup']:.2f}x | {r.get('speedup_median', math.nan):.2f}x | {diff} | "
            f"{r['err_official']:.3f} | {r['err_ours']:.3f} | "
            f"{r.get('fresh_mb_official', math.nan):.1f} | {r.get('fresh_mb_ours', math.nan):.1f} |"
        )
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_results(rows: Sequence[dict], out_dir: Path, meta: dict) -> tuple[Path, Path]:
    """Write `official.md` and `official.json` into `out_dir` (each through a temporary file and a rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    header = ", ".join(f"{key}={value}" for key, value in meta.items())
    md = f"# hf_lara vs the official HKUNLP modules\n\n{header}\n\n{format_table(rows)}\n\n{NOTES}\n"
    md_path, json_path = out_dir / "official.md", out_dir / "official.json"
    _write_atomic(md_path, md)
    _write_atomic(json_path, json.dumps({"meta": meta, "rows": list(rows)}, indent=1) + "\n")
    return md_path, json_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official_path", default=None, help=f"exported `efficient-attention` folder (or ${ENV_VAR})")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument(
        "--cases", nargs="+", default=[f"{m}{'-causal' if c else ''}" for m, c in CASES], help="e.g. rfa eva-causal"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    root = resolve_official_path(args.official_path)
    if root is None:
        print(f"skipped: official efficient-attention not found (pass --official_path or set {ENV_VAR})")
        return 0
    cases = [(name.removesuffix("-causal"), name.endswith("-causal")) for name in args.cases]
    for case in cases:
        if case not in CASES:
            parser.error(f"unknown case {case}; valid: rfa, lara, eva, eva-causal")
    torch.set_num_threads(args.threads)
    ea = load_official(root)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for n in args.lengths:
        for method, causal in cases:
            rows.append(measure(ea, method, causal, n, args.warmup, args.reps))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    meta = {
        "B": B, "H": H, "D": D, "dtype": "fp32", "threads": args.threads, "warmup": args.warmup,
        "reps": args.reps, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "load_average": f"{load_before:.1f}->{os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan'):.1f}",
    }  # fmt: skip
    print(format_table(rows))
    write_results(rows, args.out, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
