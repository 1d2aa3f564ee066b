"""Tiny random Hugging Face causal LMs of several architectures, built locally for interop tests.

Each comes with the tokenizer conventions of its family: Llama adds BOS and has no pad token,
Qwen2 has no BOS and ends chat turns with its own token (a list of EOS ids in its generation config),
GPT-NeoX and GPT-2 add nothing, OPT projects its hidden states to a smaller embedding width.
"""
from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("gpt2", "llama", "qwen2", "gpt_neox", "opt")
WORDS = ["count:"] + [str(i) for i in range(50)] + ["the", "a", "is", "user", "assistant"]


def _tokenizer(arch: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = {"gpt2": ["<|endoftext|>"], "llama": ["<unk>", "<s>", "</s>"], "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                "gpt_neox": ["<|endoftext|>", "<|padding|>"], "opt": ["<pad>", "</s>", "<unk>"]}[arch]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    model = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {}
    if arch == "gpt2":
        kwargs = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    elif arch == "llama":  # adds BOS itself; no pad token
        model.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
        kwargs = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    elif arch == "qwen2":  # no BOS
        kwargs = dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    elif arch == "gpt_neox":
        kwargs = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|padding|>")
    elif arch == "opt":  # OPT's tokenizer prepends </s> as BOS
        model.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", vocab["</s>"])])
        kwargs = dict(bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, **kwargs)
    tokenizer.model_max_length = 64
    return tokenizer


def build_tiny_causal_lm(arch: str, out_dir: str | Path, dtype: torch.dtype = torch.float32, dropout: float = 0.0, seed: int = 0) -> Path:
    """A random 2-layer model of `arch` and its tokenizer, saved with save_pretrained (in `dtype`)."""
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, OPTConfig,
                              OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(seed)
    tokenizer = _tokenizer(arch)
    n = len(tokenizer)
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=n, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=dropout,
                                           embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=bos, eos_token_id=eos))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                             num_key_value_heads=1, max_position_embeddings=64, attention_dropout=dropout, bos_token_id=bos, eos_token_id=eos))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                             num_key_value_heads=1, max_position_embeddings=64, bos_token_id=None, eos_token_id=eos))
        model.generation_config.eos_token_id = [eos, tokenizer.convert_tokens_to_ids("<|im_end|>")]  # chat end-of-turn too
    elif arch == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                 max_position_embeddings=64, hidden_dropout=dropout, attention_dropout=dropout, bos_token_id=bos, eos_token_id=eos))
    elif arch == "opt":
        model = OPTForCausalLM(OPTConfig(vocab_size=n, hidden_size=32, word_embed_proj_dim=16, ffn_dim=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=64, dropout=dropout, attention_dropout=dropout,
                                         bos_token_id=bos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id))
    else:
        raise ValueError(f"unknown arch {arch!r}; one of {ARCHS}")
    out = Path(out_dir)
    model.to(dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
