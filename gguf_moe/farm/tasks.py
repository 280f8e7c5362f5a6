"""The plan expanded into tasks, and what a task does where it runs.

Per model (``<outdir>/<name>/``):

* ``imatrix/NNN`` (one per chunk group, ``calibrate.chunk_groups``) -> the group's sums
  (``<state>/parts/<name>/imatrix-NNN.npz``); ``imatrix`` adds them in group order and writes
  ``<name>.imatrix.gguf`` as ``gguf-moe imatrix`` does;
* ``convert/TYPE`` -> ``<name>-<TYPE>.gguf`` (or its split set), as ``gguf-moe convert``
  writes it (with the imatrix when the plan has one);
* ``eval/NNN`` -> the group's per-token figures; ``eval`` puts them in place and writes
  ``eval.json``, the object ``gguf-moe eval --json`` prints;
* ``card`` -> ``README.md`` (with the eval figures) and ``manifest.json``.

A task is a plain dict (``TaskSpec``): paths and small values, never weights.  ``run_task``
runs one in a worker and returns a small dict: the outputs with their sha256 and sizes.
Every output is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from gguf_moe import __version__
from gguf_moe.errors import GgufMoeError

__all__ = ["expand", "run_task", "sha256_file", "task_key", "FAULT_ENV"]

#: Fault injection for tests: ``crash-once:<task id>:<marker file>`` makes that task's
#: process exit abruptly on its first attempt (the marker records that it did).
FAULT_ENV = "GGUF_MOE_FARM_FAULT"

_MB = 1 << 20

#: set in a local executor's worker: a queue for ``(task id, worker)`` when a task starts
STARTED = None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(8 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _source_identity(source: str) -> Any:
    """What identifies the source's content cheaply: file names, sizes and mtimes of a local
    directory (a Hub source is identified by its repo id and revision)."""
    p = Path(source)
    if not p.is_dir():
        return source
    out = []
    for f in sorted(p.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".json", ".model", ".yml", ".yaml")):
            st = f.stat()
            out.append([f.name, st.st_size, st.st_mtime_ns])
    return [source, out]


def task_key(spec: dict, dep_keys: list[str]) -> str:
    """A digest of everything that decides a task's outputs: its parameters, the gguf-moe
    version, the source files and the keys of the tasks it reads from."""
    blob = json.dumps(
        {"kind": spec["kind"], "params": spec["params"], "version": __version__, "outputs": spec["outputs"],
         "source": _source_identity(spec["source"]), "commit": spec.get("source_commit"), "deps": dep_keys},  # fmt: skip
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _text_digest(path: Path) -> str:
    return sha256_file(path)


# --------------------------------------------------------------------------- expansion


def _layer_bytes(model) -> tuple[int, int]:
    """float32 bytes of the largest decoder layer, and of the embedding/output matrices."""
    per: dict[int, int] = {}
    other = 0
    for t in model.tensors:
        n = int(np.prod(t.shape)) * 4
        parts = t.name.split(".")
        if parts[0] == "blk":
            per[int(parts[1])] = per.get(int(parts[1]), 0) + n
        else:
            other = max(other, n)
    return (max(per.values()) if per else 0), other


def _chunks_of(model, spec, n_embd: int, n_models: int, cache: Path, save: bool) -> tuple[int, list[range], str]:
    """Chunk count and groups of a text, and where its token ids are kept for the tasks
    (``<cache>``: tokenized once here, not once per group task)."""
    from gguf_moe.calibrate import chunk_groups
    from gguf_moe.textinput import text_chunks

    ids, batches = text_chunks(model, spec.text, spec.ctx, spec.chunks)
    if save:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".part.npy")
        np.save(tmp, np.asarray(ids, dtype=np.int64))
        os.replace(tmp, cache)
    return len(batches), chunk_groups(len(batches), spec.ctx, n_embd, n_models=n_models), str(cache)


def _static(preset) -> bool:
    """Presets whose bytes do not use an imatrix: the float types."""
    return preset.name in ("F32", "F16", "BF16")


def output_paths(job, preset) -> str:
    from gguf_moe.convert import output_name

    return str(job.dir / output_name(job.name, preset))


def expand(plan, save: bool = True) -> list[dict]:
    """Every task of the plan in dependency order, with resources and keys (``save``: keep
    the texts' token ids in the state folder for the tasks; a dry run writes nothing)."""
    from gguf_moe.convert import plan_outputs
    from gguf_moe.hub import open_source
    from gguf_moe.imatrix import Imatrix
    from gguf_moe.options import Options
    from gguf_moe.runner import ModelSpec
    from gguf_moe.source import open_model
    from gguf_moe.split import SplitSpec, assign_shards, shard_path

    tasks: list[dict] = []
    for job in plan.models:
        with open_source(job.source) as (model_dir, hub):
            commit = hub.commit if hub is not None else None  # a moving branch: its commit now
            hub_id = hub.repo_id if hub is not None else None
            model = open_model(model_dir)
            try:
                layer, head = _layer_bytes(model)
                n_embd = int(model.hparams["n_embd"])
                needs_run = job.imatrix is not None or job.eval is not None
                if needs_run:
                    ModelSpec.from_source(model)  # the architecture can be run
                split = SplitSpec(max_bytes=job.split_max_size, max_tensors=None) if job.split_max_size else None
                sizes = {}
                n_shards: dict[str, int] = {}
                for p in job.presets:
                    im = Imatrix(Path("planned"), {}) if job.imatrix is not None and not _static(p) else None
                    o = plan_outputs(model, [p], [None], Options(imatrix=im, split=split))[0]
                    sizes[p.name] = (sum(-(-t.nbytes // 32) * 32 for t in o.tensors) + 16 * _MB, o.bits_per_weight)
                    if split is not None:  # the shards the set will have (llama-gguf-split's assignment)
                        n_shards[p.name] = len(assign_shards([t.nbytes for t in o.tensors], split, [t.name for t in o.tensors]))
                tok_dir = Path(plan.state) / "parts" / job.name
                im_chunks = (_chunks_of(model, job.imatrix, n_embd, 1, tok_dir / "imatrix-tokens.npy", save)
                             if job.imatrix is not None else None)  # fmt: skip
                ev_chunks = (_chunks_of(model, job.eval, n_embd, 1 + len(job.presets), tok_dir / "eval-tokens.npy", save)
                             if job.eval is not None else None)  # fmt: skip
            finally:
                model.close()
        # a Hub source is pinned to the commit it resolved to now, for every task of the run
        source = f"{hub_id}@{commit}" if commit else job.source
        base = {"model": job.name, "source": source, "source_commit": commit, "dir": str(job.dir),
                "state": str(plan.state), "split_max_size": job.split_max_size}  # fmt: skip

        def add(kind: str, tid: str, params: dict, outputs: list[str], deps: list[str], memory: int, **extra) -> dict:
            t = {**base, "id": f"{job.name}/{tid}", "kind": kind, "params": params, "outputs": outputs,
                 "deps": [f"{job.name}/{d}" for d in deps], "memory": int(memory), "cpus": 1, "gpus": 0, **extra}  # fmt: skip
            tasks.append(t)
            return t

        parts_dir = Path(plan.state) / "parts" / job.name
        im_path = None
        im_deps: list[str] = []
        if job.imatrix is not None:
            s = job.imatrix
            n_chunk, groups, tokens = im_chunks
            tp = {"text": str(s.text), "text_sha256": _text_digest(s.text), "ctx": s.ctx, "chunks": s.chunks}
            act = 6 * max(len(g) for g in groups) * s.ctx * n_embd * 4
            part_ids = []
            for gi in range(len(groups)):
                tid = f"imatrix/{gi:03d}"
                add("imatrix_part", tid, {**tp, "group": gi, "n_groups": len(groups), "device": job.device, "tokens": tokens},
                    [str(parts_dir / f"imatrix-{gi:03d}.npz")], [], 2 * layer + act + 512 * _MB,
                    gpus=1 if job.device == "cuda" else 0)  # fmt: skip
                part_ids.append(tid)
            im_path = str(job.dir / f"{job.name}.imatrix.gguf")
            add("imatrix", "imatrix", {**tp, "n_chunk": n_chunk, "n_groups": len(groups)}, [im_path], part_ids,
                256 * _MB + 2 * layer)  # fmt: skip
            im_deps = ["imatrix"]
        files = []
        conv_ids = []
        for p in job.presets:
            uses = im_path is not None and not _static(p)
            out = output_paths(job, p)
            files.append(out)
            params = {"preset": p.name, "imatrix": im_path if uses else None, "split_max_size": job.split_max_size}
            n = n_shards.get(p.name, 1)
            if n > 1:  # a split set: one task per shard, each reading only its tensors
                for k in range(n):
                    tid = f"convert/{p.name}/{k + 1:05d}"
                    add("convert", tid, {**params, "shard": k, "set": out}, [str(shard_path(Path(out), k, n))], im_deps if uses else [],
                        512 * _MB, size=sizes[p.name][0] // n, bpw=sizes[p.name][1])  # fmt: skip
                    conv_ids.append(tid)
                continue
            add("convert", f"convert/{p.name}", params, [out], im_deps if uses else [], 512 * _MB,
                size=sizes[p.name][0], bpw=sizes[p.name][1])  # fmt: skip
            conv_ids.append(f"convert/{p.name}")
        eval_json = None
        if job.eval is not None:
            s = job.eval
            n_chunk, groups, tokens = ev_chunks
            tp = {"text": str(s.text), "text_sha256": _text_digest(s.text), "ctx": s.ctx, "chunks": s.chunks,
                  "files": files}  # fmt: skip
            n_models = 1 + len(files)
            act = 3 * n_models * max(len(g) for g in groups) * s.ctx * n_embd * 4
            part_ids = []
            for gi, g in enumerate(groups):
                tid = f"eval/{gi:03d}"
                add("eval_part", tid, {**tp, "group": gi, "n_groups": len(groups), "device": job.device, "tokens": tokens},
                    [str(parts_dir / f"eval-{gi:03d}.npz")], conv_ids, 2 * layer + 3 * head + act + 512 * _MB,
                    gpus=1 if job.device == "cuda" else 0)  # fmt: skip
                part_ids.append(tid)
            eval_json = str(job.dir / "eval.json")
            add("eval", "eval", {**tp, "n_groups": len(groups)}, [eval_json], part_ids, 256 * _MB + head)
        card_deps = conv_ids + (["eval"] if eval_json else []) + (["imatrix"] if im_path else [])
        add("card", "card", {"presets": [p.name for p in job.presets], "files": files, "imatrix": im_path,
            "eval": eval_json, "split_max_size": job.split_max_size,
            "imatrix_text": None if job.imatrix is None else job.imatrix.__dict__,
            "eval_text": None if job.eval is None else job.eval.__dict__},
            [str(job.dir / "README.md"), str(job.dir / "manifest.json")], card_deps, 256 * _MB)  # fmt: skip
    keys: dict[str, str] = {}
    for t in tasks:
        t["key"] = task_key(t, [keys[d] for d in t["deps"]])
        keys[t["id"]] = t["key"]
    return tasks


# --------------------------------------------------------------------------- running


def _fault(spec: dict) -> None:
    f = spec.get("fault")
    if not f:
        return
    kind, _, rest = f.partition(":")
    tid, _, marker = rest.rpartition(":")
    if kind == "crash-once" and tid == spec["id"]:
        m = Path(marker)
        if not m.exists():
            m.write_text(str(os.getpid()))
            os._exit(17)


def _replace(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part.npz")
    np.savez(tmp, **arrays)
    _replace(tmp, path)


def _outputs(paths: list[str]) -> list[dict]:
    return [{"path": str(p), "sha256": sha256_file(p), "bytes": Path(p).stat().st_size} for p in paths]


def _split_files(path: str, split_max_size) -> list[str]:
    """The files output ``path`` was written as: itself, or the shards of its split set
    (``<stem>-00001-of-0000N.gguf`` ...; the newest set when an older one is still there)."""
    if not split_max_size:
        return [path]
    from gguf_moe.split import shard_paths_of

    p = Path(path)
    stem = p.name[: -len(".gguf")] if p.name.endswith(".gguf") else p.name
    firsts = sorted(p.parent.glob(f"{stem}-00001-of-[0-9][0-9][0-9][0-9][0-9].gguf"), key=lambda f: f.stat().st_mtime_ns)
    if not firsts:
        return [path]
    return [str(x) for x in shard_paths_of(firsts[-1])]


def _eval_file(path: str, split_max_size) -> str:
    """The file ``gguf-moe eval`` is given for an output: the first shard of a split set."""
    return _split_files(path, split_max_size)[0]


def _tokens(p: dict) -> list[int] | None:
    """The text's token ids the driver saved, or None (then the task tokenizes the text)."""
    f = p.get("tokens")
    if not f or not Path(f).is_file():
        return None
    return np.load(f).tolist()


def run_task(spec: dict) -> dict:
    """Run one task (in a worker process); returns ``{"outputs": [...], "result": {...},
    "worker": ..., "seconds": ...}``.  Library errors propagate as GgufMoeError."""
    t0 = time.perf_counter()
    if STARTED is not None:
        STARTED.put((spec["id"], _worker_name()))
    _fault(spec)
    threads = spec.get("threads")
    kind, p = spec["kind"], spec["params"]
    result: dict[str, Any] = {}
    if kind == "imatrix_part":
        from gguf_moe.calibrate import compute_imatrix
        from gguf_moe.hub import open_source

        with open_source(spec["source"]) as (model_dir, _):
            r = compute_imatrix(model_dir, p["text"], ctx=p["ctx"], chunks=p["chunks"], threads=threads,
                                device=p["device"], only_groups=[p["group"]], tokens=_tokens(p))  # fmt: skip
        part = r.parts[p["group"]]
        arrays = {}
        for name, (s, c) in part.items():
            arrays[f"s:{name}"], arrays[f"c:{name}"] = s, c
        _save_npz(Path(spec["outputs"][0]), arrays)
        paths = spec["outputs"]
    elif kind == "imatrix":
        from gguf_moe.calibrate import reduce_groups, result_of
        from gguf_moe.imatrix import write_imatrix

        parts = []
        for gi in range(p["n_groups"]):
            f = Path(spec["state"]) / "parts" / spec["model"] / f"imatrix-{gi:03d}.npz"
            with np.load(f) as z:
                part = {}
                for k in z.files:
                    if k.startswith("s:"):
                        name = k[2:]
                        part[name] = (z[k], z[f"c:{name}"])
                parts.append(part)
        entries = reduce_groups(parts)
        out = Path(spec["outputs"][0])
        out.parent.mkdir(parents=True, exist_ok=True)
        write_imatrix(out, entries, datasets=[p["text"]], chunk_count=p["n_chunk"], chunk_size=p["ctx"])
        r = result_of(entries, p["n_chunk"], p["ctx"], p["n_chunk"] * p["ctx"], 0.0, p["n_groups"])
        result = {"unrouted": [list(u) for u in r.unrouted], "entries": len(entries)}
        paths = spec["outputs"]
    elif kind == "convert":
        paths = _convert(spec, threads)
        result = {"files": paths}
    elif kind == "eval_part":
        from gguf_moe.evaluate import evaluate
        from gguf_moe.hub import open_source

        files = [_eval_file(f, spec.get("split_max_size")) for f in p["files"]]
        with open_source(spec["source"]) as (model_dir, _):
            r = evaluate(model_dir, files, p["text"], ctx=p["ctx"], chunks=p["chunks"], threads=threads,
                         device=p["device"], only_groups=[p["group"]], tokens=_tokens(p))  # fmt: skip
        g = r.groups[p["group"]]
        n_score = p["ctx"] - 1 - p["ctx"] // 2
        a, b = g.start * n_score, g.stop * n_score
        _save_npz(Path(spec["outputs"][0]), {"nll": r.nll[:, a:b], "kld": r.kld[:, a:b], "same": r.same[:, a:b],
                                             "start": np.array([a, b, r.nll.shape[1]])})  # fmt: skip
        paths = spec["outputs"]
    elif kind == "eval":
        from gguf_moe.evaluate import summarize
        from gguf_moe.runner import GGUFWeights

        files = [_eval_file(f, spec.get("split_max_size")) for f in p["files"]]
        nll = kld = same = None
        for gi in range(p["n_groups"]):
            f = Path(spec["state"]) / "parts" / spec["model"] / f"eval-{gi:03d}.npz"
            with np.load(f) as z:
                a, b, n = (int(v) for v in z["start"])
                if nll is None:
                    nll = np.zeros((z["nll"].shape[0], n), dtype=np.float64)
                    kld = np.zeros((z["kld"].shape[0], n), dtype=np.float64)
                    same = np.zeros((z["same"].shape[0], n), dtype=bool)
                nll[:, a:b], kld[:, a:b], same[:, a:b] = z["nll"], z["kld"], z["same"]
        res = summarize(files, [GGUFWeights(f) for f in files], nll, kld, same)
        out = Path(spec["outputs"][0])
        tmp = out.with_name(out.name + ".part")
        tmp.write_text(json.dumps(res.to_dict()) + "\n", encoding="utf-8")
        _replace(tmp, out)
        paths = spec["outputs"]
    elif kind == "card":
        paths = _card(spec)
    else:  # an internal error: a task kind the expansion does not make
        raise ValueError(f"unknown task kind {kind!r}")
    return {
        "outputs": _outputs(paths),
        "result": result,
        "worker": _worker_name(),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _worker_name() -> str:
    """host:pid, and the Ray node (first 8 hex digits of its id) inside a Ray worker."""
    import sys

    name = f"{socket.gethostname()}:{os.getpid()}"
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        name += f"@{ray.get_runtime_context().get_node_id()[:8]}"
    return name


def _convert(spec: dict, threads) -> list[str]:
    from gguf_moe import convert as conv
    from gguf_moe.hub import open_source
    from gguf_moe.imatrix import load_imatrix
    from gguf_moe.options import Options
    from gguf_moe.presets import get_preset
    from gguf_moe.source import open_model
    from gguf_moe.split import SplitSpec

    p = spec["params"]
    out = Path(p["set"]) if p.get("shard") is not None else Path(spec["outputs"][0])  # (a shard: its set's name)
    out.parent.mkdir(parents=True, exist_ok=True)
    split = SplitSpec(max_bytes=p["split_max_size"], max_tensors=None) if p["split_max_size"] else None
    opts = Options(imatrix=load_imatrix(p["imatrix"]) if p["imatrix"] else None, split=split, space_check=False,
                   force=True, threads=threads, split_shard=p.get("shard"))  # fmt: skip
    with open_source(spec["source"]) as (model_dir, _):
        model = open_model(model_dir)
        try:
            plans = conv.plan_outputs(model, [get_preset(p["preset"])], [out], opts)
            for o in plans:
                conv.check_imatrix(o, opts.imatrix)
            written = conv.convert(model, plans, opts)
        finally:
            model.close()
    if p.get("shard") is not None:
        return [str(w) for w in written]
    return _split_files(str(out), p["split_max_size"])


def _card(spec: dict) -> list[str]:
    from gguf import GGUFReader

    from gguf_moe.card import CardFile, eval_figures, render_card, source_license, write_card
    from gguf_moe.hub import open_source
    from gguf_moe.metadata import load_recipe

    p = spec["params"]
    outdir = Path(spec["dir"])
    evaluation = json.loads(Path(p["eval"]).read_text(encoding="utf-8")) if p["eval"] else None
    files = []
    for preset, f in zip(p["presets"], p["files"]):
        paths = [Path(x) for x in _split_files(f, p["split_max_size"])]
        nb = ne = 0
        for x in paths:
            for t in GGUFReader(x).tensors:
                nb += int(t.n_bytes)
                ne += int(t.n_elements)
        cf = CardFile(preset, paths, 8.0 * nb / ne if ne else 0.0)
        if evaluation is not None:
            cf.figures = eval_figures(evaluation, cf)
        files.append(cf)
    with open_source(spec["source"]) as (model_dir, hub):
        text = render_card(
            name=spec["model"],
            base_model=hub.repo_id if hub is not None else spec["model"],
            base_is_repo=hub is not None,
            recipe=load_recipe(model_dir),
            files=files,
            license=source_license(model_dir),
            evaluated_tokens=(evaluation or {}).get("tokens"),
        )
    card = write_card(outdir, text)
    made_by = {"gguf_moe": __version__, "source": spec["source"]}
    entries = []
    for cf, f in zip(files, p["files"]):
        for x in cf.paths:
            entries.append({"file": x.name, "kind": "gguf", "type": cf.type, "bits_per_weight": round(cf.bits_per_weight, 4),
                            "parameters": {"preset": cf.type, "imatrix": Path(p["imatrix"]).name if p["imatrix"] and
                                           cf.type not in ("F32", "F16", "BF16") else None,
                                           "split_max_size": p["split_max_size"]}})  # fmt: skip
    if p["imatrix"]:
        entries.append({"file": Path(p["imatrix"]).name, "kind": "imatrix", "type": "imatrix", "parameters": p["imatrix_text"]})
    if p["eval"]:
        entries.append({"file": Path(p["eval"]).name, "kind": "eval", "type": "eval", "parameters": p["eval_text"]})
    entries.append({"file": card.name, "kind": "card", "type": "card", "parameters": {}})
    for e in entries:
        f = outdir / e["file"]
        e["bytes"] = f.stat().st_size
        e["sha256"] = sha256_file(f)
    manifest = {"model": spec["model"], "made_by": made_by, "files": entries}
    out = outdir / "manifest.json"
    tmp = out.with_name(out.name + ".part")
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
    _replace(tmp, out)
    return [str(card), str(out)]


def is_library_error(e: BaseException) -> bool:
    return isinstance(e, GgufMoeError)
