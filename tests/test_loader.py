"""Model loading: config styles, sharded checkpoints, dtypes, dummy weights, clear errors, no shadowing."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from spool.engine import LLM, ConfigError, SamplingParams
from spool.engine.config import ModelConfig
from spool.engine.models.rope import inv_freq


def _greedy(path, **kw) -> list[int]:
    llm = LLM(str(path), device="cpu", **kw)
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    return llm.generate({"prompt_token_ids": [5, 9, 33, 70, 12]}, p)[0].outputs[0].token_ids


def test_sharded_checkpoint_loads_identically(tiny_llama, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_llama, sharded)
    (sharded / "model.safetensors").unlink()
    tensors = load_file(str(tiny_llama / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(sharded / fname))
        weight_map.update({n: fname for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert _greedy(sharded) == _greedy(tiny_llama)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConfigError, match="model-00002-of-00002"):
        LLM(str(sharded), device="cpu")


def test_incomplete_dirs_and_unsupported_arch(tiny_llama, tmp_path):
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_llama, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no weights"):
        LLM(str(no_weights), device="cpu")
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama / f, no_tok / f)
    with pytest.raises(ConfigError, match="tokenizer"):
        LLM(str(no_tok), device="cpu")
    gpt = tmp_path / "gpt"
    shutil.copytree(tiny_llama, gpt)
    cfg = json.loads((gpt / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (gpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        LLM(str(gpt), device="cpu")
    missing_tensor = tmp_path / "missing_tensor"
    shutil.copytree(tiny_llama, missing_tensor)
    t = load_file(str(missing_tensor / "model.safetensors"))
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, str(missing_tensor / "model.safetensors"))
    with pytest.raises(ConfigError, match="layers.1.mlp.gate_up_proj.weight"):
        LLM(str(missing_tensor), device="cpu")


BASE = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1,
    "num_attention_heads": 4, "num_key_value_heads": 1, "vocab_size": 100, "max_position_embeddings": 4096,
}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def test_rope_config_styles_agree_with_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hub = ModelConfig.from_dict({**BASE, "rope_theta": 500000.0, "rope_scaling": {**LLAMA3, "type": "llama3"}})
    v5 = ModelConfig.from_dict({**BASE, "rope_parameters": {**LLAMA3, "rope_theta": 500000.0}})
    assert hub.rope_theta == v5.rope_theta == 500000.0
    assert torch.equal(inv_freq(hub), inv_freq(v5))
    hf_cfg = LlamaConfig(**{k: v for k, v in BASE.items() if k != "architectures"},
                         rope_parameters={**LLAMA3, "rope_theta": 500000.0})
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    torch.testing.assert_close(inv_freq(v5), hf_inv.float(), rtol=1e-6, atol=0)
    default = ModelConfig.from_dict({**BASE, "rope_theta": 10000.0})
    assert default.rope_scaling is None
    with pytest.raises(ConfigError, match="yarn"):
        ModelConfig.from_dict({**BASE, "rope_scaling": {"type": "yarn", "factor": 4.0}})


def test_qwen_flags_and_tied_embeddings():
    q2 = ModelConfig.from_dict({**BASE, "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True})
    q3 = ModelConfig.from_dict({**BASE, "architectures": ["Qwen3ForCausalLM"], "head_dim": 128})
    assert q2.qkv_bias and not q2.o_bias and q2.tie_word_embeddings and not q2.qk_norm
    assert q3.qk_norm and q3.head_dim == 128 and not q3.qkv_bias


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_dtypes_run(tiny_llama, dtype):
    llm = LLM(str(tiny_llama), device="cpu", dtype=dtype)
    assert llm.engine.runner.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    assert len(_greedy(tiny_llama, dtype=dtype)) == 6


def test_dummy_weights_need_only_config(tiny_llama, tmp_path):
    only_cfg = tmp_path / "cfg_only"
    only_cfg.mkdir()
    shutil.copy(tiny_llama / "config.json", only_cfg / "config.json")
    llm = LLM(str(only_cfg), device="cpu", load_format="dummy")
    assert llm.get_tokenizer() is None
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].text == ""
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("text needs a tokenizer")


def test_our_kernels_package_does_not_shadow_transformers(tiny_llama):
    """spool's Triton kernels are spool.kernels: a top-level `kernels` is never ours. transformers >= 5.25 requires
    Hugging Face's `kernels` and imports it as such; with spool 0.1's top-level `kernels` first on sys.path, that
    import failed (`cannot import name 'CUDAProperties' from 'kernels'`) and so did every model."""
    import importlib.util
    from pathlib import Path

    import spool
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("kernels")
    ours = Path(spool.__file__).resolve().parent
    if spec is not None:  # Hugging Face's package, where installed (transformers 5.25 on requires it)
        origin = Path(spec.origin).resolve()
        assert not origin.is_relative_to(ours) and origin != ours.parent / "kernels" / "__init__.py", origin
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 512)
