"""Pretraining from scratch: the offline tiny model that every later stage starts from.

1. Train a byte-level BPE tokenizer (digits split one per token) on the built-in synthetic corpus.
2. Build a fresh Llama-style model of `model.size` (or continue from `model.path`).
3. Pack the corpus into fixed-length blocks and train next-token prediction on all of it.
4. Save tokenizer + model in Hugging Face format to `<run>/final/`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Collection, Iterable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from posttrain.config import ModelConfig, OptimConfig, RunConfig, param, section
from posttrain.data.corpus import plain_text, synthetic_documents
from posttrain.errors import ConfigError
from posttrain.eval.report import write_training_report
from posttrain.models import build_model, count_parameters, load_tokenizer_and_model, save_pretrained
from posttrain.models.attention import position_limit
from posttrain.models.tokenizer import train_tokenizer
from posttrain.train.engine import TrainConfig, Trainer, once_per_step
from posttrain.train.entry import stage_main
from posttrain.train.run_dir import RunResult, prepare_run_dir
from posttrain.train.sources import ShuffledStepSource

# Held-out text is drawn from a generator seeded apart from the training stream.
HELDOUT_SEED_OFFSET = 1_000_003

logger = logging.getLogger("posttrain.pretrain")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = param(1024, "BPE vocabulary size, special tokens included.", ge=300)
    train_documents: int = param(20_000, "Corpus documents used to learn the BPE merges.", ge=100)


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    train_documents: int = param(60_000, "Synthetic documents in the training stream.", ge=10)
    heldout_documents: int = param(600, "Held-out documents for the eval loss.", ge=10)
    chat_share: float = param(0.25, "Share of documents that are chat-formatted dialogues.", ge=0, le=1)
    seq_len: int = param(128, "Tokens per packed training block.", ge=8)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    run: RunConfig = section(lambda: RunConfig(name="pretrain"), "Run directory, seed, logging.")
    model: ModelConfig = section(ModelConfig, "Model to build (or continue from).")
    tokenizer: TokenizerConfig = section(TokenizerConfig, "Tokenizer training (ignored with model.path).")
    corpus: CorpusConfig = section(CorpusConfig, "Built-in synthetic corpus.")
    optim: OptimConfig = section(lambda: OptimConfig(lr=3e-3, warmup_steps=50, weight_decay=0.01),
                                 "Optimizer and schedule.")
    train: TrainConfig = section(lambda: TrainConfig(max_steps=900, batch_size=32, micro_batch_size=32,
                                                     save_every=200, eval_every=200),
                                 "Loop length, batch size, checkpoints and evaluation.")


@stage_main(PretrainConfig)
def main(cfg: PretrainConfig) -> RunResult:
    if not cfg.model.path and cfg.corpus.seq_len > cfg.model.max_position_embeddings:
        # The built model's config.json would claim fewer positions than it was trained on (RoPE does not care; every
        # tool that reads the config as the model's limit would).
        raise ConfigError(f"corpus.seq_len={cfg.corpus.seq_len} is longer than model.max_position_embeddings="
                          f"{cfg.model.max_position_embeddings} of the model this run builds: raise "
                          "model.max_position_embeddings to at least the block length", field="corpus.seq_len")
    tokenizer, model = _tokenizer_and_model(cfg)
    _check_model(tokenizer, model, cfg.corpus)
    train_texts = document_texts(tokenizer, synthetic_documents(cfg.run.seed, cfg.corpus.chat_share),
                                 cfg.corpus.train_documents)
    # Held-out text is no training document (short facts and greetings recur in the stream): its loss is of text
    # the model has not been trained on.
    heldout_texts = document_texts(tokenizer, synthetic_documents(cfg.run.seed + HELDOUT_SEED_OFFSET,
                                                                  cfg.corpus.chat_share),
                                   cfg.corpus.heldout_documents, leave_out=set(train_texts))
    train_blocks = pack_texts(tokenizer, train_texts, cfg.corpus.seq_len, "corpus.train_documents")
    heldout_blocks = pack_texts(tokenizer, heldout_texts, cfg.corpus.seq_len, "corpus.heldout_documents")
    initial_eval = heldout_loss(model, heldout_blocks, cfg.train.micro_batch_size)

    predicted_per_block = cfg.corpus.seq_len - 1
    source = ShuffledStepSource(
        len(train_blocks), cfg.train.batch_size, cfg.train.micro_batch_size, cfg.run.seed,
        collate=lambda idx: train_blocks[idx],
        count=lambda idx: (len(idx) * predicted_per_block, len(idx) * cfg.corpus.seq_len), rows=train_blocks)

    def loss_fn(model: PreTrainedModel, blocks: torch.Tensor, normaliser: float) -> tuple[torch.Tensor, dict]:
        # HF's loss is the mean over this micro-batch's predicted tokens: rescale to the step's global count.
        loss = model(input_ids=blocks, labels=blocks).loss * (len(blocks) * predicted_per_block) / normaliser
        return loss, {"loss": loss.item()}

    evaluate = once_per_step(lambda step: {"eval_loss": heldout_loss(model, heldout_blocks,
                                                                     cfg.train.micro_batch_size)})

    run_dir = prepare_run_dir(cfg.run, cfg, stage="pretrain")  # the first write, once everything is ready
    trainer = Trainer(stage="pretrain", cfg=cfg, run=cfg.run, train=cfg.train, optim=cfg.optim,
                      run_dir=run_dir, model=model, tokenizer=tokenizer)
    result = trainer.fit(source, loss_fn, evaluate, progress_keys=("loss", "eval_loss"))
    final_dir = save_pretrained(model, tokenizer, run_dir.final)
    summary = {"parameters": count_parameters(model), "steps": result.step, "tokens": result.tokens,
               "initial_eval_loss": initial_eval, "final_eval_loss": result.last.get("eval_loss"),
               "final_loss": result.last.get("loss"), "seconds": result.seconds,
               "precision": result.precision}
    write_training_report(run_dir, "Pretraining", summary)
    return RunResult(run_dir=run_dir.path, final_dir=final_dir, summary=summary)


def _tokenizer_and_model(cfg: PretrainConfig) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    if cfg.model.path:
        return load_tokenizer_and_model(cfg.model, compares_logprobs=False)
    documents = itertools.islice(synthetic_documents(cfg.run.seed, cfg.corpus.chat_share),
                                 cfg.tokenizer.train_documents)
    tokenizer = train_tokenizer((plain_text(d) for d in documents), vocab_size=cfg.tokenizer.vocab_size)
    return tokenizer, build_model(cfg.model, tokenizer, seed=cfg.run.seed)


def _check_model(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, corpus: CorpusConfig) -> None:
    """What a model continued from `model.path` must have: an end-of-text token (every document ends with one) and
    positions for a block (a learned position table, GPT-2's or OPT's, indexed past its end mid-run)."""
    if tokenizer.eos_token is None:
        raise ConfigError("the tokenizer has no end-of-text token (eos_token): documents could not be told apart "
                          "in the packed stream", field="model.path")
    limit = position_limit(model)
    if limit is not None and corpus.seq_len > limit:
        raise ConfigError(f"{corpus.seq_len} tokens per block, but the model has positions for {limit}",
                          field="corpus.seq_len")
    if corpus.chat_share > 0 and tokenizer.chat_template is None:
        logger.warning("the tokenizer has no chat template: the corpus's dialogues (corpus.chat_share=%g) are "
                       "written as plain text", corpus.chat_share)


def document_texts(tokenizer: PreTrainedTokenizerBase, documents: Iterable[str | list[dict[str, str]]], count: int,
                   leave_out: Collection[str] = ()) -> list[str]:
    """`count` documents as text, each from BOS (where the tokenizer has one) to EOS: a dialogue through the chat
    template (which ends it with EOS), as plain text where there is none. Documents whose text is in `leave_out`
    are skipped (at most 100 tries per document: a corpus of few distinct documents cannot give enough)."""
    texts: list[str] = []
    for tries, document in enumerate(documents):
        if len(texts) == count or tries == 100 * count:
            break
        if isinstance(document, list) and tokenizer.chat_template is not None:
            text = tokenizer.apply_chat_template(document, tokenize=False)
        else:
            text = (tokenizer.bos_token or "") + plain_text(document) + tokenizer.eos_token
        if text not in leave_out:
            texts.append(text)
    return texts


def pack_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], seq_len: int, field: str) -> torch.Tensor:
    """Join the documents' tokens into one stream and cut it into blocks of `seq_len`: int64 [N, seq_len]. Each text
    carries its own BOS/EOS, so no special tokens are added; `field` is the setting that sizes `texts`."""
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    stream = torch.tensor(list(itertools.chain.from_iterable(encoded)), dtype=torch.long)
    blocks = stream.numel() // seq_len
    if blocks == 0:
        raise ConfigError(f"{len(texts)} documents give {stream.numel()} tokens, fewer than one block of "
                          f"corpus.seq_len={seq_len}", field=field)
    return stream[: blocks * seq_len].view(blocks, seq_len)


@torch.no_grad()
def heldout_loss(model: PreTrainedModel, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss over all held-out blocks (each block weighted by its token count)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i:i + batch_size].to(model.device)
        total += model(input_ids=batch, labels=batch).loss.item() * batch.numel()
        count += batch.numel()
    return total / count
