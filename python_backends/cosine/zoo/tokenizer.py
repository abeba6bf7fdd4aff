"""The zoo's one tokenizer: byte-level BPE, so any UTF-8 text round-trips, shared by the target and all drafters."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"


def train_tokenizer(documents: list[str], vocab_size: int, context: int, out_dir: Path,
                    progress: bool = True) -> PreTrainedTokenizerFast:
    """Train on the documents and save to out_dir in the layout AutoTokenizer.from_pretrained loads."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    reading = tqdm(documents, desc="tokenizer", unit="doc", disable=not progress)
    bpe.train_from_iterator(reading, trainer, length=len(documents))
    # Every encoded text starts with BOS, as every training document does.
    bpe.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bpe.token_to_id(BOS))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                        model_max_length=context)
    tokenizer.save_pretrained(out_dir)
    _name_class_portably(out_dir / "tokenizer_config.json")
    return tokenizer


def _name_class_portably(config_path: Path) -> None:
    # transformers 5 records its internal class name, which transformers 4 (e.g. in Triton images) cannot load;
    # PreTrainedTokenizerFast is the name both understand.
    config = json.loads(config_path.read_text())
    config.pop("backend", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def encode_documents(tokenizer: PreTrainedTokenizerFast, documents: Iterable[str]) -> list[list[int]]:
    """Token ids of each document as trained on: BOS, the text, EOS."""
    encodings = tokenizer.backend_tokenizer.encode_batch(list(documents))
    return [encoding.ids + [tokenizer.eos_token_id] for encoding in encodings]
