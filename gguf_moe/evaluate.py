"""``gguf-moe eval``: perplexity and KL divergence of GGUF files against their source model.

The text is tokenized and chunked as ``llama-perplexity`` does (``gguf_moe.textinput``:
chunks of ``ctx`` tokens, the first replaced by BOS); in every chunk the logits at
positions ``ctx/2 .. ctx-2`` score the next token, ``ctx - 1 - ctx/2`` tokens per chunk.

The source (safetensors, float32) and every GGUF (dequantized with ``quant.dequantize``)
run through the same layer-by-layer model (``gguf_moe.runner``) in lockstep: layer ``L`` of
each model is loaded, run on that model's hidden states and dropped before layer ``L+1``.
Per file: perplexity, KL divergence from the source's distribution per scored token (mean
and 99th percentile, interpolated as llama-perplexity does), and how often both pick the
same top token.

By default each GGUF's matrix products round their activations the way llama.cpp's CPU
backend does (Q8_0 / Q8_K by weight type, ``runner.Runner(round_activations=True)``); a
plain float run of the dequantized weights underestimates the loss of Q8_0-class files.

The chunks run in the fixed groups of ``calibrate.chunk_groups``; every scored token's
figures land at their own place in the per-token arrays, and the summary (``summarize``)
is taken over the whole arrays, so ``gguf-moe farm`` can score the groups as separate tasks
and print the same object as ``gguf-moe eval --json``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import MODEL_TENSOR as T

from gguf_moe.calibrate import chunk_groups, set_threads
from gguf_moe.errors import LayoutMismatch
from gguf_moe.runner import (
    GGUFWeights, ModelSpec, Runner, SourceWeights, import_torch, pick_device, release_memory, tensor_name,
)  # fmt: skip
from gguf_moe.textinput import text_chunks

__all__ = ["FileScore", "EvalResult", "evaluate", "summarize", "check_matches_source"]


@dataclass
class FileScore:
    file: str
    type: str
    bytes: int
    bpw: float
    ppl: float
    kld_mean: float
    kld_p99: float
    top1: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class EvalResult:
    tokens: int
    source_ppl: float
    files: list[FileScore] = field(default_factory=list)
    seconds: float = 0.0
    kld: np.ndarray | None = field(default=None, repr=False)  # [file, scored token]
    nll: np.ndarray | None = field(default=None, repr=False)  # [source + files, scored token]
    same: np.ndarray | None = field(default=None, repr=False)  # [file, scored token]: same top-1
    #: the chunk groups (``calibrate.chunk_groups``); with ``only_groups`` only those were scored
    groups: list[range] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "source": {"ppl": self.source_ppl}, "files": [f.to_dict() for f in self.files]}


def _file_type_name(w: GGUFWeights) -> str:
    import gguf

    f = w.reader.fields.get("general.file_type")
    if f is None:
        return "unknown"
    ft = int(f.contents())
    try:
        from gguf_moe.presets import _lookup

        return _lookup(str(ft)).name
    except Exception:
        try:
            return gguf.LlamaFileType(ft).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            return str(ft)


def _bpw(w: GGUFWeights) -> float:
    nb = sum(int(t.n_bytes) for t in w.tensors)  # (every shard of a split set)
    ne = sum(int(t.n_elements) for t in w.tensors)
    return 8.0 * nb / ne if ne else 0.0


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    i = 0
    while i < len(shape) - 1 and shape[i] == 1:
        i += 1
    return tuple(shape[i:])


def check_matches_source(w: GGUFWeights, src: SourceWeights, model) -> None:
    """Every tensor the forward pass reads exists in the GGUF with the source's shape."""
    f = w.reader.fields.get("general.architecture")
    arch = f.contents() if f is not None else None
    if arch != model.arch:
        raise LayoutMismatch(f"{w.path}: architecture {arch!r}, but the source {model.path} is {model.arch!r}; not a GGUF of this model")
    for t in model.tensors:
        if t.name == tensor_name(T.OUTPUT) and not w.has(t.name):
            continue  # a GGUF may tie the output to the embedding
        if not w.has(t.name):
            raise LayoutMismatch(f"{w.path}: has no tensor {t.name}, which the source has; not a GGUF of {model.path}")
        if _squeeze(w.shape(t.name)) != _squeeze(tuple(t.shape)):  # ggml drops trailing ne of 1
            raise LayoutMismatch(
                f"{w.path}: tensor {t.name} has shape {list(w.shape(t.name))}, the source's is {list(t.shape)}; "
                f"not a GGUF of {model.path}"
            )


def evaluate(
    src_dir: str | Path,
    files: list[str | Path],
    text_file: str | Path,
    *,
    ctx: int = 512,
    chunks: int | None = None,
    threads: int | None = None,
    device: str | None = None,
    round_activations: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    only_groups: list[int] | None = None,
    tokens: list[int] | None = None,
) -> EvalResult:
    """Score ``files``; with ``only_groups`` only those chunk groups are scored and the
    result carries the raw per-token arrays (their slices filled) and no ``files``.
    ``tokens``: the text's token ids when already known (the tokenizer's output for it)."""
    from gguf_moe.source import open_model

    torch = import_torch()
    dev = pick_device(device)
    set_threads(threads)
    t0 = time.perf_counter()
    model = open_model(src_dir)
    try:
        spec = ModelSpec.from_source(model)
        src_w = SourceWeights(model)
        ggufs = [GGUFWeights(f) for f in files]
        for g in ggufs:
            check_matches_source(g, src_w, model)
        batches = text_chunks(model, text_file, ctx, chunks, tokens)[1]
        weights = [src_w, *ggufs]
        # each file with the routing llama.cpp's graph gives it (the source's, unless the file
        # was written with --allow-routing-mismatch)
        runners = [Runner(spec, device=dev)] + [
            Runner(spec.for_file(g.reader), device=dev, round_activations=round_activations) for g in ggufs
        ]
        n_models = len(weights)
        groups = chunk_groups(len(batches), ctx, spec.n_embd, n_models=n_models)
        run = [i for i in range(len(groups)) if only_groups is None or i in only_groups]
        first = ctx // 2
        n_score = ctx - 1 - first
        nll = np.zeros((n_models, len(batches) * n_score), dtype=np.float64)
        kld = np.zeros((len(ggufs), len(batches) * n_score), dtype=np.float64)
        same = np.zeros((len(ggufs), len(batches) * n_score), dtype=bool)
        total = len(run) * n_models * (spec.n_layer + 1)
        done = 0

        def step():
            nonlocal done
            done += 1
            if on_progress is not None:
                on_progress(done, total)

        with torch.no_grad():
            for g in (groups[i] for i in run):
                sub = batches[g.start : g.stop]
                target = torch.from_numpy(sub[:, first + 1 :]).to(dev)
                hs = [r.embed(w, sub) for r, w in zip(runners, weights)]
                rope = runners[0].rope_tables(src_w, ctx)
                for L in range(spec.n_layer):
                    for m, (r, w) in enumerate(zip(runners, weights)):
                        lw = r.load_layer(w, L)
                        r.layer(lw, hs[m], L, rope)
                        del lw
                        release_memory()
                        step()
                # scores, a few chunks at a time, with two output matrices in memory: the
                # source's and one file's (the source's log-probs are recomputed per file)
                src_head = runners[0].load_head(src_w)
                step()
                for k in range(len(ggufs)):
                    head = runners[k + 1].load_head(ggufs[k])
                    step()
                    for i in range(0, len(sub), 2):
                        tgt = target[i : i + 2]
                        o = (g.start + i) * n_score
                        n = tgt.numel()
                        x = runners[0].head_input(src_head, hs[0][i : i + 2, first : ctx - 1])
                        base = torch.log_softmax(runners[0].logits(src_head, x).double(), dim=-1)
                        x = runners[k + 1].head_input(head, hs[k + 1][i : i + 2, first : ctx - 1])
                        q = torch.log_softmax(runners[k + 1].logits(head, x).double(), dim=-1)
                        if k == 0:
                            nll[0, o : o + n] = (-base.gather(-1, tgt[..., None])[..., 0]).reshape(-1).cpu().numpy()
                        nll[k + 1, o : o + n] = (-q.gather(-1, tgt[..., None])[..., 0]).reshape(-1).cpu().numpy()
                        kld[k, o : o + n] = (base.exp() * (base - q)).sum(-1).reshape(-1).cpu().numpy()
                        same[k, o : o + n] = (q.argmax(-1) == base.argmax(-1)).reshape(-1).cpu().numpy()
                        del base, q, x
                    del head
                del hs, src_head
        if only_groups is not None:
            return EvalResult(tokens=int(nll.shape[1]), source_ppl=float("nan"), kld=kld, nll=nll, same=same,
                              groups=groups, seconds=time.perf_counter() - t0)  # fmt: skip
        result = summarize(files, ggufs, nll, kld, same)
        result.groups = groups
        result.seconds = time.perf_counter() - t0
        return result
    finally:
        model.close()


def summarize(files: list[str | Path], ggufs: list[GGUFWeights], nll: np.ndarray, kld: np.ndarray, same: np.ndarray) -> EvalResult:
    """The figures from the per-token arrays of every scored token."""
    result = EvalResult(tokens=int(nll.shape[1]), source_ppl=float(np.exp(nll[0].mean())), kld=kld, nll=nll, same=same)
    for k, (f, g) in enumerate(zip(files, ggufs)):
        result.files.append(
            FileScore(
                file=str(f),
                type=_file_type_name(g),
                bytes=sum(p.stat().st_size for p in g.files),
                bpw=round(_bpw(g), 4),
                ppl=float(np.exp(nll[k + 1].mean())),
                kld_mean=float(kld[k].mean()),
                kld_p99=float(np.percentile(kld[k], 99.0)),
                top1=float(same[k].mean()),
            )
        )
    return result
