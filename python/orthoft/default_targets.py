"""The modules OFT and BOFT adapt by default in each transformers model type (``target_modules=None``).

The same defaults as PEFT's OFT/BOFT mapping, so that a config without ``target_modules`` adapts the
same layers in both.
"""

from __future__ import annotations

_QUERY_VALUE = ["query", "value"]
_Q_V_PROJ = ["q_proj", "v_proj"]
_QKV = ["query_key_value"]

DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": _Q_V_PROJ,
    "gpt2": ["c_attn"],
    "bloom": _QKV,
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": _Q_V_PROJ,
    "gptj": _Q_V_PROJ,
    "gpt_neox": _QKV,
    "gpt_neo": _Q_V_PROJ,
    "bert": _QUERY_VALUE,
    "roberta": _QUERY_VALUE,
    "xlm-roberta": _QUERY_VALUE,
    "electra": _QUERY_VALUE,
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": _QUERY_VALUE,
    "llama": _Q_V_PROJ,
    "llama4": _Q_V_PROJ,
    "chatglm": _QKV,
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": _QKV,
    "RefinedWeb": _QKV,
    "falcon": _QKV,
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": _Q_V_PROJ,
    "mixtral": _Q_V_PROJ,
    "stablelm": _Q_V_PROJ,
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": _Q_V_PROJ,
    "gemma2": _Q_V_PROJ,
    "gemma3_text": _Q_V_PROJ,
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": _Q_V_PROJ,
    "qwen3": _Q_V_PROJ,
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}
