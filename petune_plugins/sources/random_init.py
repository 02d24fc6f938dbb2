"""Random-weight models from small configs: ``random:tiny-llama``, ``random:tiny-bert``,
``random:tiny-t5`` (a T5-like encoder-decoder).

For tests and smoke runs: they need no download, build in a second and are cached.
The tokenizer is trained here on a fixed corpus so everything stays offline and
deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path

from petune import hookimpl
from petune.api import ModelSource
from petune.errors import UserError
from petune.models import cache_dir

_VERSION = 1  # bump when a shape or the tokenizer changes, to rebuild caches

_CORPUS = """
the quick brown fox jumps over the lazy dog . a good movie with a great story and fine acting .
a bad film , boring and far too long . i loved it . i hated it . the plot was thin but the cast was strong .
john smith lives in new york and works for acme corporation in london . mary visited paris in june .
translate the sentence into german . summarize the text in one sentence . answer the question below .
what is the capital of france ? the capital of france is paris . write a short poem about the sea .
### instruction : ### input : ### response : user : assistant : system : hello , how can i help you today ?
numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 ! " # $ % & ' ( ) * + - / ; < = > @ [ ] ^ _ ` { | } ~ positive negative neutral world sports business science technology
""".split("\n")

SHAPES = {
    "tiny-llama": dict(
        arch="llama",
        config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False),
    ),
    "tiny-bert": dict(
        arch="bert",
        config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=128, type_vocab_size=2),
    ),
    "tiny-t5": dict(
        arch="t5",
        config=dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, relative_attention_max_distance=32,
                    feed_forward_proj="relu", tie_word_embeddings=False),
    ),
}


def _tokenizer(arch: str):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [line for line in _CORPUS if line.strip()] * 4
    if arch == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]", model_max_length=128,
        )
    if arch == "t5":  # T5's layout: <pad> = 0 (also the decoder start), </s> = 1 appended to every text
        specials = ["<pad>", "</s>", "<unk>"]
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        eos = tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", eos)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                       model_max_length=256)
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=256,
    )


def build(shape: str, path: Path) -> Path:
    """Write config, random weights (seed 0) and tokenizer for ``shape`` into ``path``."""
    import torch
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    spec = SHAPES[shape]
    tokenizer = _tokenizer(spec["arch"])
    torch.manual_seed(0)
    if spec["arch"] == "bert":
        config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **spec["config"])
        model = BertForMaskedLM(config)
    elif spec["arch"] == "t5":
        config = T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                          **spec["config"])
        model = T5ForConditionalGeneration(config)
    else:
        config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **spec["config"])
        model = LlamaForCausalLM(config)
    import os
    import shutil

    # built apart and renamed into place: whole folder or nothing, and two processes building
    # the same shape at once (parallel tests) never write into each other's folder
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "petune_random.json").write_text(json.dumps({"shape": shape, "version": _VERSION}))
    try:
        tmp.rename(path)
    except OSError:
        if not path.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: same seed, same model
    return path


class RandomInitSource(ModelSource):
    name = "random"
    description = "random-weight models from small configs, for tests and smoke runs"
    priority = 10

    def names(self) -> list[str]:
        return [f"random:{shape}" for shape in SHAPES]

    def claims(self, name: str) -> bool:
        return name.startswith("random:")

    def resolve(self, name: str) -> Path:
        shape = name.removeprefix("random:")
        if shape not in SHAPES:
            raise UserError(f"unknown random model shape {shape!r}", where="model.name",
                            hint=f"choose one of: {', '.join(self.names())}")
        path = cache_dir("models", "random") / f"{shape}-v{_VERSION}"
        if not path.exists():
            build(shape, path)
        return path


@hookimpl
def register_model_sources(register):
    register(RandomInitSource)
