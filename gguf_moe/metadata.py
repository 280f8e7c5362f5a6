"""GGUF key/value metadata for a converted model, in llama.cpp's converter order.

``add_model_metadata`` writes what ``convert_hf_to_gguf.py`` writes for a llama-arch model
(``ModelBase.prepare_metadata`` then ``TextModel.set_gguf_parameters`` and
``LlamaModel.set_gguf_parameters``), in the same order:

1. ``general.architecture`` (added by ``GGUFWriter`` itself), ``general.type``;
2. model-card keys through gguf-py's ``Metadata`` (``general.name`` = the model card's name
   or the directory name, ``general.size_label`` like ``4x7B``, base models, ...);
3. hyperparameters (``llama.block_count`` ... ``llama.rope.dimension_count``) and
   ``general.file_type``, ``general.quantization_version``;
4. tokenizer keys (``gguf_moe.tokenizer.add_tokenizer``);
5. beyond llama.cpp: the mergekit-moe recipe under ``moe.`` (docs/metadata.md).

For block-quantized outputs ``general.quantization_version`` and ``general.file_type`` are
moved to the end, which is what ``llama-quantize`` does to a converted file, so a direct
Q4_K_M conversion has the same KV list as ``convert --outtype bf16`` + ``llama-quantize``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
from gguf import GGUFValueType, Keys

from gguf_moe.errors import ConfigError

if TYPE_CHECKING:
    from gguf_moe.presets import Preset
    from gguf_moe.source import SourceModel

__all__ = ["add_model_metadata", "tokenizer_kvs", "load_recipe", "recipe_kvs", "MOE_PREFIX", "ROUTING_KEYS"]

MOE_PREFIX = "moe."
RECIPE_FILE = "mergekit_moe_config.yml"


def load_recipe(src: Path) -> dict[str, Any] | None:
    """The parsed ``mergekit_moe_config.yml``, or None when the directory has none."""
    path = src / RECIPE_FILE
    if not path.is_file():
        return None
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot parse the mergekit-moe recipe ({e}); fix or remove the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping with 'base_model' and 'experts'")
    experts = data.get("experts", [])
    if not isinstance(experts, list) or not all(isinstance(e, dict) for e in experts):
        raise ConfigError(f"{path}: 'experts' must be a list of mappings with 'source_model'")
    return data


def _prompts(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list):
        return [str(x) for x in v]
    return [str(v)]


def recipe_kvs(recipe: dict[str, Any]) -> list[tuple[str, Any, GGUFValueType, GGUFValueType | None]]:
    """The ``moe.*`` keys for a mergekit-moe recipe: (key, value, type, array element type)."""
    S, U, A = GGUFValueType.STRING, GGUFValueType.UINT32, GGUFValueType.ARRAY
    out: list[tuple[str, Any, GGUFValueType, GGUFValueType | None]] = []
    for key in ("base_model", "gate_mode", "dtype", "architecture"):
        v = recipe.get(key)
        if v is not None and str(v) != "":
            out.append((MOE_PREFIX + key, str(v), S, None))
    for key in ("experts_per_token", "shared_experts"):
        v = recipe.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            out.append((MOE_PREFIX + key, v, U, None))
    experts = recipe.get("experts") or []
    out.append((MOE_PREFIX + "expert_count", len(experts), U, None))
    for i, e in enumerate(experts):
        p = f"{MOE_PREFIX}expert.{i}."
        if e.get("source_model") is not None:
            out.append((p + "source_model", str(e["source_model"]), S, None))
        for key in ("positive_prompts", "negative_prompts"):
            vals = _prompts(e.get(key))
            if vals:
                out.append((p + key, vals, A, S))
        if isinstance(e.get("noise_scale"), (int, float)) and not isinstance(e.get("noise_scale"), bool):
            out.append((p + "noise_scale", float(e["noise_scale"]), GGUFValueType.FLOAT32, None))
    return out


def _base_model_entry(model_id: str) -> dict[str, str]:
    """``general.base_model.N.*`` fields for a model id, the way gguf-py's Metadata treats
    a model card's ``base_model`` (``org/name`` -> name, organization, repo_url)."""
    if model_id.startswith(("http://", "https://")):
        return {"name": model_id.rstrip("/").rsplit("/", 1)[-1], "repo_url": model_id}
    parts = model_id.strip("/").split("/")
    if len(parts) == 2 and not Path(model_id).is_absolute() and not model_id.startswith("."):
        org, name = parts
        return {
            "name": gguf.Metadata.id_to_title(name),
            "organization": gguf.Metadata.id_to_title(org),
            "repo_url": f"https://huggingface.co/{org}/{name}",
        }
    return {"name": parts[-1] if parts else model_id}


def _source_models(recipe: dict[str, Any]) -> list[str]:
    seen: dict[str, None] = {}
    if recipe.get("base_model"):
        seen[str(recipe["base_model"])] = None
    for e in recipe.get("experts") or []:
        if e.get("source_model"):
            seen[str(e["source_model"])] = None
    return list(seen)


def _model_card(model: SourceModel, total: tuple[int, int, int, int], recipe: dict | None) -> gguf.Metadata:
    meta = gguf.Metadata.load(None, model.path.resolve(), None, total[0])
    if meta.name is None:
        meta.name = model.name
    if meta.size_label is None and total[0] > 0:
        meta.size_label = gguf.size_label(*total)
    if recipe is not None and meta.base_models is None:
        sources = _source_models(recipe)
        if sources:
            meta.base_models = [_base_model_entry(s) for s in sources]
    return meta


def _hparams(w: gguf.GGUFWriter, model: SourceModel, file_type: int) -> None:
    """``TextModel.set_gguf_parameters`` + ``LlamaModel`` / ``Qwen2MoeModel``'s additions,
    in order; optional keys only when config.json has them (as the converter does)."""
    cfg, hp = model.config, model.hparams
    ff_field = model.routing.feed_forward if model.routing is not None else "n_ff"
    w.add_block_count(hp.n_layer)
    if cfg.get("max_position_embeddings") is not None:
        w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(hp.n_embd)
    w.add_feed_forward_length(hp[ff_field])
    w.add_head_count(hp.n_head)
    if cfg.get("num_key_value_heads") is not None:
        w.add_head_count_kv(hp.n_head_kv)
    rope = hp.rope
    rope_type = rope.get("rope_type")
    factor = rope.get("factor")
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        # present: normalize_hparams refuses yarn scaling without it
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if rope.get("extrapolation_factor") is not None:
            w.add_rope_scaling_yarn_ext_factor(rope["extrapolation_factor"])
        attn = rope.get("attention_factor", rope.get("attn_factor"))
        if attn is not None:
            w.add_rope_scaling_yarn_attn_factor(attn)
        if rope.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        if rope.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    elif rope_type in ("su", "longrope"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    if hp.rope_theta is not None:
        w.add_rope_freq_base(float(hp.rope_theta))
    if hp.rms_eps is not None:
        w.add_layer_norm_rms_eps(float(hp.rms_eps))
    if hp.n_expert:
        w.add_expert_count(hp.n_expert)
        w.add_expert_used_count(hp.n_expert_used)
    if cfg.get("scoring_func") == "softmax":  # (the converter's score-function keys; the only one we read)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    if hp.head_dim_explicit:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    w.add_file_type(file_type)
    if model.spec is not None and model.spec.write_kvs is not None:
        model.spec.write_kvs(w, model)


#: written only to a file whose routing differs from its source's (``--allow-routing-mismatch``)
ROUTING_KEYS = ("moe.routing.file", "moe.routing.source")


def add_routing_kvs(w: gguf.GGUFWriter, model: SourceModel) -> None:
    """Record, in a file that computes another routing than its source (written on
    request), what each of them computes."""
    r = model.routing
    if r is None or r.faithful:
        return
    w.add_string(ROUTING_KEYS[0], r.file)
    w.add_string(ROUTING_KEYS[1], r.source)


def _move_to_end(w: gguf.GGUFWriter, key: str) -> None:
    kv = w.kv_data[0]
    if key in kv:
        kv[key] = kv.pop(key)


def tokenizer_kvs(model: SourceModel, pre_tokenizer: str | None = None) -> dict[str, gguf.GGUFValue]:
    """The tokenizer's KVs (``gguf_moe.tokenizer.add_tokenizer``), in order, computed once
    so that several outputs of one conversion can share them."""
    from gguf_moe.tokenizer import add_tokenizer

    scratch = gguf.GGUFWriter(None, model.arch)
    before = set(scratch.kv_data[0])
    add_tokenizer(scratch, model.path, vocab_size=model.hparams.vocab_size, pre_tokenizer=pre_tokenizer)
    return {k: v for k, v in scratch.kv_data[0].items() if k not in before}


def add_model_metadata(
    w: gguf.GGUFWriter,
    model: SourceModel,
    preset: Preset,
    *,
    pre_tokenizer: str | None = None,
    recipe: bool = True,
    tokenizer: dict[str, gguf.GGUFValue] | None = None,
) -> None:
    """Add every KV of the output file to ``w`` (tensor infos must already be added:
    the size label counts their parameters).  ``tokenizer``: KVs from ``tokenizer_kvs``
    (computed here when not given)."""
    rec = load_recipe(model.path) if recipe else None
    w.add_type(gguf.GGUFType.MODEL)
    _model_card(model, w.get_total_parameter_count(), rec).set_gguf_meta_model(w)
    _hparams(w, model, preset.file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer is None:
        tokenizer = tokenizer_kvs(model, pre_tokenizer)
    for key, val in tokenizer.items():
        if key == Keys.Tokenizer.ADD_PREFIX and not (model.spec is not None and model.spec.writes_add_prefix):
            continue  # only LlamaModel.set_vocab writes it
        w.add_key_value(key, val.value, val.type, sub_type=val.sub_type)
    if rec is not None:
        for key, val, vtype, sub in recipe_kvs(rec):
            w.add_key_value(key, val, vtype, sub_type=sub)
    add_routing_kvs(w, model)
    if not preset.is_float:
        # llama-quantize re-sets these two keys, which moves them to the end.
        _move_to_end(w, Keys.General.QUANTIZATION_VERSION)
        _move_to_end(w, Keys.General.FILE_TYPE)
