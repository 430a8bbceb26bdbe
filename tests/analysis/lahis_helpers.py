"""Tiny random decoder LMs of every family LAHIS supports (built here, no hub downloads)."""

import torch
import transformers as tf

FAMILIES = ["llama", "mistral", "qwen2", "gemma3", "cohere"]


def make_lm(family: str = "llama", seed: int = 0, layers: int = 2, heads: int = 4, kv_heads: int = 2,
            dtype=torch.float32):
    """A random causal LM: vocab 64, hidden 32, head dim 8, GQA (heads / kv_heads queries per KV head)."""
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    configs = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
        "cohere": (tf.CohereConfig, tf.CohereForCausalLM),
    }
    config_cls, model_cls = configs[family]
    if family == "gemma3":
        kw["head_dim"] = 8
    torch.manual_seed(seed)
    return model_cls(config_cls(**kw)).to(dtype).eval()


def random_docs(n: int, seed: int = 1, vocab: int = 64, min_len: int = 4, max_len: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    return [torch.randint(3, vocab, (int(t),), generator=g).tolist() for t in lengths]


def save_lm_with_tokenizer(folder: str, texts: list[str], seed: int = 0):
    """A tiny Llama with a byte-level BPE tokenizer trained on texts, written as a save_pretrained folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = tf.LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok
