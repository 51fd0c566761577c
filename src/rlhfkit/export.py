"""Export: the aligned model as a plain Hugging Face directory and as a GGUF file for llama.cpp-based tools.

The HF directory holds merged weights (safetensors), tokenizer, chat template and generation config,
and loads with `AutoModelForCausalLM.from_pretrained` alone. The GGUF file (f16 or q8_0) is written with
the `gguf` package in llama.cpp's layout for Llama-architecture models (SmolLM2, Llama, Mistral-style):
tensor names, q/k rows permuted to GGML's rotary layout, and the byte-level BPE tokenizer (tokens, types,
merges, special ids, chat template). `check_gguf` reads the file back through transformers' GGUF loader
and compares logits with the HF model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError
from .paths import make_temp_dir, publish_dir

GGUF_TYPES = ("f16", "q8_0")
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def export_hf(src: Path, out: Path) -> Path:
    """Copy a stage's final model (already merged) into a clean HF directory, published in one rename."""
    from transformers import AutoConfig, GenerationConfig

    src = Path(src)
    if (src / "adapter_model.safetensors").is_file() and not (src / "model.safetensors").is_file():
        raise ConfigError(f"{src} holds a LoRA adapter only; export needs merged weights (lora.save: merged)")
    if not (src / "model.safetensors").is_file():
        raise ConfigError(f"{src}: no model.safetensors to export")
    tmp = make_temp_dir(out)
    for name in _HF_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
    if not (tmp / "generation_config.json").is_file():
        GenerationConfig.from_model_config(AutoConfig.from_pretrained(src)).save_pretrained(tmp)
    publish_dir(tmp, out)
    return out


def _permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows → GGML's interleaved pairs (llama.cpp's convert script does the same)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensor_name(name: str) -> str | None:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")
    if parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        key = ".".join(parts[3:-1])
        if key in _LAYER_NAMES:
            return f"blk.{parts[2]}.{_LAYER_NAMES[key]}.weight"
    return None


def write_gguf(model_dir: Path, out_file: Path, qtype: str = "f16") -> Path:
    """Write model_dir (a Llama-architecture HF directory) as one GGUF file, atomically."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    if qtype not in GGUF_TYPES:
        raise ConfigError(f"GGUF type must be one of {GGUF_TYPES}, got {qtype!r}")
    model_dir, out_file = Path(model_dir), Path(out_file)
    cfg = AutoConfig.from_pretrained(model_dir)
    if cfg.model_type not in ("llama", "mistral"):
        raise ConfigError(f"GGUF export supports Llama-architecture models; {model_dir} is {cfg.model_type!r}")
    tok = AutoTokenizer.from_pretrained(model_dir)
    weights = load_file(str(model_dir / "model.safetensors"))
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))

    tmp = out_file.with_name(out_file.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch="llama")
    w.add_name(model_dir.name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(rope_theta))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    _add_tokenizer(w, tok, model_dir, cfg.vocab_size)

    for name, tensor in weights.items():
        gname = _gguf_tensor_name(name)
        if gname is None:
            raise ConfigError(f"GGUF export: no llama.cpp name for tensor {name!r}")
        data = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            data = _permute_rotary(data, n_head)
        elif name.endswith("k_proj.weight"):
            data = _permute_rotary(data, n_kv)
        if data.ndim == 1:  # norms stay f32, as llama.cpp writes them
            w.add_tensor(gname, data.astype(np.float32))
        elif qtype == "f16":
            w.add_tensor(gname, data.astype(np.float16))
        else:
            q = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out_file)
    return out_file


def _add_tokenizer(w, tok, model_dir: Path, vocab_size: int) -> None:
    """Byte-level BPE ("gpt2" in GGUF): tokens by id, their types, merges, special ids, chat template."""
    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if spec.get("model", {}).get("type") != "BPE":
        raise ConfigError("GGUF export supports byte-level BPE tokenizers")
    special = set(tok.all_special_ids)
    added = {t["id"] for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i < len(tok):
            tokens.append(tok.convert_ids_to_tokens(i))
            types.append(3 if i in special else 4 if i in added else 1)  # control / user-defined / normal
        else:  # embedding rows beyond the tokenizer
            tokens.append(f"[PAD{i}]")
            types.append(5)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm" if "smollm" in (tok.name_or_path or "").lower() else "default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for setter, token_id in ((w.add_bos_token_id, tok.bos_token_id), (w.add_eos_token_id, tok.eos_token_id),
                             (w.add_pad_token_id, tok.pad_token_id), (w.add_unk_token_id, tok.unk_token_id)):
        if token_id is not None:
            setter(int(token_id))
    w.add_add_bos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


@torch.no_grad()
def check_gguf(model_dir: Path, gguf_file: Path, text: str = "Human: What is the capital of France?") -> dict:
    """Load the GGUF back through transformers and compare its logits with the HF model's on one prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(model_dir)(text, return_tensors="pt").input_ids
    a, b = hf(ids).logits[0].float(), back(ids).logits[0].float()
    return {"max_abs_logit_diff": float((a - b).abs().max()), "logit_scale": float(a.abs().max()),
            "same_argmax_share": float((a.argmax(-1) == b.argmax(-1)).float().mean()), "tokens": int(ids.shape[1])}
