"""``gguf-moe imatrix``: llama-imatrix's importance matrix, computed from the safetensors.

The text is tokenized and chunked as llama-imatrix does (``gguf_moe.textinput``), then
the source model runs layer by layer (``gguf_moe.runner``), collecting per weight the
squared inputs summed per column and the token counts, per expert for the expert
tensors.  The result is written in llama-imatrix's GGUF format (``imatrix.write_imatrix``).

The chunks are run in fixed groups (``chunk_groups``: at most ``GROUP_CHUNKS`` chunks, fewer
when their hidden states would exceed ``ACTIVATION_BUDGET``), each group summed on its own
and the group sums added in chunk order (``reduce_groups``).  The groups depend only on the
text, ``ctx`` and the model, so ``gguf-moe farm`` can run them as separate tasks on any
number of workers and still write the same bytes as ``gguf-moe imatrix``.

What llama-imatrix collects, and so what is written: every matrix product with a
``blk.*`` weight (attn_q/k/v/output, the router ffn_gate_inp, ffn_gate/up/down or their
``_exps`` / ``_shexp`` forms, ffn_gate_inp_shexp) and, with ``process_output``,
``output.weight``; never ``token_embd``.  Experts no token was routed to are written with
zero sums and counts, as llama-imatrix does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import MODEL_TENSOR as T

from gguf_moe.runner import Collector, ModelSpec, Runner, SourceWeights, import_torch, pick_device, tensor_name
from gguf_moe.textinput import text_chunks

__all__ = ["ImatrixResult", "compute_imatrix", "chunk_groups", "reduce_groups", "ACTIVATION_BUDGET", "GROUP_CHUNKS"]

#: Hidden states of at most this many bytes are kept at once; more chunks are run in groups
#: (each group reads the layers again).
ACTIVATION_BUDGET = 1 << 30
#: At most this many chunks per group: the unit of work ``gguf-moe farm`` spreads over workers.
GROUP_CHUNKS = 16


@dataclass
class ImatrixResult:
    entries: dict[str, tuple[np.ndarray, np.ndarray]]
    chunk_count: int
    chunk_size: int
    n_tokens: int
    expert_tokens: list[list[int]] = field(default_factory=list)  # [layer][expert]
    seconds: float = 0.0
    #: with ``only_groups``: group index -> that group's sums and counts (``entries`` empty)
    parts: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    n_groups: int = 0

    @property
    def unrouted(self) -> list[tuple[int, int]]:
        return [(L, e) for L, row in enumerate(self.expert_tokens) for e, c in enumerate(row) if c == 0]


def chunk_groups(n_chunk: int, ctx: int, n_embd: int, budget: int = ACTIVATION_BUDGET, n_models: int = 1) -> list[range]:
    """Consecutive groups of at most ``GROUP_CHUNKS`` chunks whose hidden states (``n_models``
    models at once) fit ``budget``."""
    per = max(1, min(GROUP_CHUNKS, budget // max(1, n_models * ctx * n_embd * 4)))
    return [range(i, min(n_chunk, i + per)) for i in range(0, n_chunk, per)]


def reduce_groups(parts: list[dict[str, tuple[np.ndarray, np.ndarray]]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The group sums added in the order given (chunk order): float64 sums, int64 counts."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for part in parts:
        for name, (s, c) in part.items():
            if name not in out:
                out[name] = (np.zeros(s.shape, dtype=np.float64), np.zeros(c.shape, dtype=np.int64))
            out[name] = (out[name][0] + s, out[name][1] + c)
    return out


def set_threads(threads: int | None) -> None:
    if threads:
        import_torch().set_num_threads(threads)


def compute_imatrix(
    src_dir: str | Path,
    text_file: str | Path,
    *,
    ctx: int = 512,
    chunks: int | None = None,
    threads: int | None = None,
    device: str | None = None,
    process_output: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    only_groups: list[int] | None = None,
    tokens: list[int] | None = None,
) -> ImatrixResult:
    """Run the source model over the text; ``on_progress(done, total)`` per layer pass.
    ``only_groups``: run just these chunk groups and return their sums in ``parts``.
    ``tokens``: the text's token ids when already known (the tokenizer's output for it)."""
    from gguf_moe.source import open_model

    torch = import_torch()
    dev = pick_device(device)
    set_threads(threads)
    t0 = time.perf_counter()
    model = open_model(src_dir)
    try:
        spec = ModelSpec.from_source(model)
        batches = text_chunks(model, text_file, ctx, chunks, tokens)[1]
        weights = SourceWeights(model)
        runner = Runner(spec, device=dev)
        groups = chunk_groups(len(batches), ctx, spec.n_embd)
        run = [i for i in range(len(groups)) if only_groups is None or i in only_groups]
        # a file without output.weight (tied embeddings) multiplies by token_embd, which
        # llama-imatrix never collects
        process_output = process_output and weights.has(tensor_name(T.OUTPUT))
        total = len(run) * (spec.n_layer + (1 if process_output else 0))
        parts = {}
        done = 0

        def step(_L=None):
            nonlocal done
            done += 1
            if on_progress is not None:
                on_progress(done, total)

        with torch.no_grad():
            for gi in run:
                g = groups[gi]
                col = Collector(process_output=process_output)
                H = runner.run_layers(weights, batches[g.start : g.stop], col, on_layer=step)
                if process_output:
                    norm = runner._load(weights, tensor_name(T.OUTPUT_NORM))
                    for i in range(0, H.shape[0], runner.batch):
                        col.add(tensor_name(T.OUTPUT), runner._rms(H[i : i + runner.batch], norm[0]))
                    step()
                del H
                parts[gi] = col.result()
        if only_groups is not None:
            return ImatrixResult(entries={}, chunk_count=len(batches), chunk_size=ctx, n_tokens=int(batches.size),
                                 seconds=time.perf_counter() - t0, parts=parts, n_groups=len(groups))  # fmt: skip
        entries = reduce_groups([parts[i] for i in range(len(groups))])
        return result_of(entries, len(batches), ctx, int(batches.size), time.perf_counter() - t0, len(groups))
    finally:
        model.close()


def result_of(entries, chunk_count: int, ctx: int, n_tokens: int, seconds: float, n_groups: int) -> ImatrixResult:
    """The result for reduced ``entries`` (tokens per expert from the expert tensors' counts)."""
    experts = []
    L = 0
    while tensor_name(T.FFN_GATE_EXP, L) in entries:
        experts.append([int(c) for c in entries[tensor_name(T.FFN_GATE_EXP, L)][1]])
        L += 1
    return ImatrixResult(
        entries=entries,
        chunk_count=chunk_count,
        chunk_size=ctx,
        n_tokens=n_tokens,
        expert_tokens=experts,
        seconds=seconds,
        n_groups=n_groups,
    )
