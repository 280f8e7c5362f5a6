"""``gguf-moe imatrix``: llama-imatrix's importance matrix, computed from the safetensors.

The text is tokenized and chunked as llama-imatrix does (``gguf_moe.textinput``), then
the source model runs layer by layer (``gguf_moe.runner``), collecting per weight the
squared inputs summed per column and the token counts, per expert for the expert
tensors.  The result is written in llama-imatrix's GGUF format (``imatrix.write_imatrix``).

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
from gguf_moe.textinput import load_tokenizer, make_chunks, read_text

__all__ = ["ImatrixResult", "compute_imatrix", "ACTIVATION_BUDGET"]

#: Hidden states of at most this many bytes are kept at once; more chunks are run in groups
#: (each group reads the layers again).
ACTIVATION_BUDGET = 1 << 30


@dataclass
class ImatrixResult:
    entries: dict[str, tuple[np.ndarray, np.ndarray]]
    chunk_count: int
    chunk_size: int
    n_tokens: int
    expert_tokens: list[list[int]] = field(default_factory=list)  # [layer][expert]
    seconds: float = 0.0

    @property
    def unrouted(self) -> list[tuple[int, int]]:
        return [(L, e) for L, row in enumerate(self.expert_tokens) for e, c in enumerate(row) if c == 0]


def chunk_groups(n_chunk: int, ctx: int, n_embd: int, budget: int = ACTIVATION_BUDGET) -> list[range]:
    per = max(1, budget // max(1, ctx * n_embd * 4))
    return [range(i, min(n_chunk, i + per)) for i in range(0, n_chunk, per)]


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
) -> ImatrixResult:
    """Run the source model over the text; ``on_progress(done, total)`` per layer pass."""
    from gguf_moe.source import open_model

    torch = import_torch()
    dev = pick_device(device)
    set_threads(threads)
    t0 = time.perf_counter()
    model = open_model(src_dir)
    try:
        spec = ModelSpec.from_source(model)
        tok = load_tokenizer(model)
        ids = tok.encode(read_text(text_file))
        batches = make_chunks(ids, ctx, chunks, tok.bos_id, tok.add_bos, str(text_file))
        weights = SourceWeights(model)
        runner = Runner(spec, device=dev)
        col = Collector(process_output=process_output)
        groups = chunk_groups(len(batches), ctx, spec.n_embd)
        total = len(groups) * (spec.n_layer + (1 if process_output else 0))
        done = 0

        def step(_L=None):
            nonlocal done
            done += 1
            if on_progress is not None:
                on_progress(done, total)

        with torch.no_grad():
            for g in groups:
                H = runner.run_layers(weights, batches[g.start : g.stop], col, on_layer=step)
                if process_output:
                    norm = runner._load(weights, tensor_name(T.OUTPUT_NORM))
                    for i in range(0, H.shape[0], runner.batch):
                        col.add(tensor_name(T.OUTPUT), runner._rms(H[i : i + runner.batch], norm[0]))
                    step()
                del H
        entries = col.result()
        experts = []
        if spec.moe:
            for L in range(spec.n_layer):
                experts.append([int(c) for c in entries[tensor_name(T.FFN_GATE_EXP, L)][1]])
        return ImatrixResult(
            entries=entries,
            chunk_count=len(batches),
            chunk_size=ctx,
            n_tokens=int(batches.size),
            expert_tokens=experts,
            seconds=time.perf_counter() - t0,
        )
    finally:
        model.close()
