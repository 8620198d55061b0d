"""Every Hugging Face causal-LM family that ships a tensor-parallel plan, as a tiny random model.

`families()` lists `(model_type, config class, model class)` for each entry of transformers'
causal-LM auto mapping whose config carries a `base_model_tp_plan`; `build(family)` makes a
2-layer model of it (hidden 64, 4 heads, 4 experts of width 32 for MoE families) from one
seed, with no download. Sizes are set through the config's own attribute names: `COMMON` for
the names most families share, `FIXES` for what a family names differently or needs to
build at all (a full-attention layer among linear-attention ones, expert groups that divide
4 experts, small sub-configs of multimodal wrappers, ...).
"""
from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

VOCAB = 128

COMMON: dict[str, Any] = dict(
    num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=VOCAB, max_position_embeddings=64,
    # mixture of experts: 4 experts of width 32, 2 per token, one shared; layer 0 dense where the family has both
    moe_intermediate_size=32, expert_ffn_hidden_size=32, shared_expert_intermediate_size=64,
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2, moe_topk=2,
    top_k_experts=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
    # multi-head latent attention
    kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, o_lora_rank=32,
    # other widths some families name apart
    shared_intermediate_size=64, shared_experts_intermediate_size=64, moe_shared_expert_intermediate_size=64,
    dense_intermediate_size=128, index_head_dim=16, index_n_heads=2, swa_head_dim=16, ssm_state_size=16,
    mamba_num_heads=8, mamba_head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2,
    linear_head_dim=16, linear_num_heads=4,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)

# family → config overrides on top of COMMON (None removes a COMMON key)
_LINEAR_ATTN = dict(linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4)
FIXES: dict[str, dict[str, Any]] = {
    "beam": dict(mlp_layer_types=["dense", "sparse"]),
    "flint": dict(mlp_only_layers=[0]),
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "dots3_note_text": dict(swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=32,
                            swa_kv_lora_rank=32, swa_head_dim=24, swa_qk_nope_head_dim=16, swa_v_head_dim=16,
                            index_topk=8),
    "gemma3n_text": dict(num_kv_shared_layers=0, vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=16,
                         laurel_rank=8, layer_types=["sliding_attention", "full_attention"]),
    "gemma4_text": dict(global_head_dim=16, enable_moe_block=True, vocab_size_per_layer_input=VOCAB,
                        hidden_size_per_layer_input=16),
    "gemma4_unified_text": dict(global_head_dim=16, vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=16),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"], shared_intermediate_size=64, mamba_d_state=16,
                             mamba_chunk_size=16, mamba_n_heads=8, mamba_d_head=16),
    "jamba": dict(layer_types=None, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  use_mamba_kernels=False),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "qwen4_exp_text": dict(_LINEAR_ATTN, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
                           indexer_compress_ratio=4, hc_lowrank=16, ple_layer_ids=[1], heads_per_ngram=2,
                           ngram_vocab_size_base=64, make_ngram_vocab_size_divisible_by=2, split_ngram_parts=1),
    "longcat_flash": dict(num_layers=2, zero_expert_num=2),
    "phi4_multimodal": dict(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14, crop_size=28),
        audio_config=dict(hidden_size=32, intermediate_size=64, num_blocks=1, num_attention_heads=2,
                          ext_pw_out_channel=32, depthwise_separable_out_channel=32, nemo_conv_channels=32)),
    "qwen3_next": dict(_LINEAR_ATTN), "qwen3_5_text": dict(_LINEAR_ATTN), "qwen3_5_moe_text": dict(_LINEAR_ATTN),
}


def _quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")


@functools.lru_cache(maxsize=1)
def families() -> tuple[tuple[str, type, type], ...]:
    """`(model_type, config class, causal-LM class)` for every causal LM whose config has a TP plan."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    _quiet()
    out = []
    for model_type, model_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        config_cls = getattr(transformers, CONFIG_MAPPING_NAMES[model_type], None)
        model_cls = getattr(transformers, model_name, None)
        if config_cls is None or model_cls is None:
            continue
        try:
            plan = config_cls().base_model_tp_plan
        except Exception:  # a default config that does not validate: the class attribute tells
            plan = getattr(config_cls, "base_model_tp_plan", None)
        if plan:
            out.append((model_type, config_cls, model_cls))
    return tuple(out)


def _has(config: Any, key: str) -> bool:
    try:
        return hasattr(config, key)
    except Exception:  # per-layer attributes raise on global access
        return True


# a multimodal config whose causal LM is built from its text config (AutoModelForCausalLM does the same)
COMPOSITE = {"llama4": ("text_config", "llama4_text")}


def tiny_config(family: str, **overrides: Any) -> Any:
    """A 2-layer config of `family` (see the module docstring)."""
    _quiet()
    config_cls = {f: c for f, c, _ in families()}[family]
    if family in COMPOSITE:
        key, text_family = COMPOSITE[family]
        return config_cls(**{key: tiny_config(text_family, **overrides).to_dict()})
    try:
        default = config_cls()
    except Exception:
        default = None
    kw: dict[str, Any] = {}
    for key, value in COMMON.items():
        if default is None or _has(default, key):
            kw[key] = value
    if default is not None and _has(default, "qk_rope_head_dim"):  # MLA: one kv head per query head
        kw["head_dim"] = COMMON["qk_rope_head_dim"]
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    for key in list(vars(default)) if default is not None else []:
        if "dropout" in key and isinstance(getattr(default, key, None), float):
            kw[key] = 0.0
    types = getattr(default, "layer_types", None) if default is not None else None
    if isinstance(types, list) and len(set(types)) > 1:  # keep one layer of each kind, attention last
        kinds = sorted(set(types), key=lambda t: ("full" in t or "attention" == t, types.index(t)))
        kw["layer_types"] = kinds if len(kinds) > 1 else kinds * 2
        kw["num_hidden_layers"] = len(kw["layer_types"])
    for key, value in FIXES.get(family, {}).items():
        if value is None:
            kw.pop(key, None)
        else:
            kw[key] = value
    kw.update(overrides)
    return config_cls(**kw)


def build(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> torch.nn.Module:
    """The tiny causal LM of `family`, initialized from `seed`."""
    _quiet()
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(dtype)
