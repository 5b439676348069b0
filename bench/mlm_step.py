"""MLM training-step throughput: sslscale's step vs the Hugging Face step a user would run instead.

Both sides train the same BERT (``BertForMaskedLM``, BERT's proportions: vocabulary 30,522,
sequence 128; hidden ``--hidden``, ``--layers``, ``--hidden / 64`` heads, FFN 4x hidden; same
initial weights) on the SAME packed blocks of 128 tokens (``sslscale data prepare text``:
``[CLS] ... [SEP]`` blocks of the corpus, no padding), with the same ``torch.optim.AdamW``
(fused, as sslscale's engine on CPU), the same threads, in the same process. Each timed step
covers collation and masking (15% of the non-special tokens; 80% ``[MASK]``, 10% random, 10%
kept), forward, backward and the optimizer step (the DeepSpeed engine and trainer around the
step are measured by ``bench/step_overhead.py``):

- baseline (transformers' ``run_mlm.py`` with ``group_texts``): ``DataCollatorForLanguageModeling``
  on the blocks (as the ``datasets`` lists of ids with a precomputed ``special_tokens_mask``, as
  ``run_mlm.py`` tokenizes; the global RNG, as ``run_mlm.py`` passes no seed),
  ``BertForMaskedLM(**batch)``: logits for every position, SDPA attention.
- sslscale: ``MLMDecoder`` on each raw sample (the ``.npy`` block as stored in the shards:
  decode, masking, the K fixed prediction slots; what the data workers do) + ``collate``, then
  ``MLMObjective``: the prediction head on the K = ``max_predictions_per_seq`` padded slots per
  block (40 of 128 at 15%), static shapes; same SDPA attention.

Unit: tokens per second (every position of a block is a real token, the same count on both
sides). Warm-up steps first, then ``--windows`` timed windows per side, interleaved, the order
flipped every pair (AB BA AB ...) so drift in the machine's load hits both sides; printed:
median and min-max of each side and of the per-window-pair ratio, the load average at the start
and the end. Goal (issue 14): >= 1.5x on CPU. Asserts nothing.

    python bench/mlm_step.py [--hidden 256 --layers 4 --batch 32 --seq-len 128 --windows 9
                             --steps 3] [--short]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import BertForMaskedLM, DataCollatorForLanguageModeling

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BERT_VOCAB = 30522  # bert-base-uncased


def prepare(args, tmp: str):
    """Token blocks ``(n, L)`` int64 of the corpus, the manifest and the tokenizer."""
    from sslscale.data.shards import load_manifest
    from sslscale.data.stream import eval_batches
    from sslscale.data.text import decode_token_block, load_tokenizer, prepare_text

    docs = Path("/usr/share/doc/python3.11/html/_sources")
    source = "text" if docs.is_dir() and not args.short else "pydoc-topics"
    prepare_text(source, tmp, seq_len=args.seq_len, val_fraction=0.0, vocab_size=args.vocab)
    manifest = load_manifest(Path(tmp) / "train")
    raw = eval_batches(manifest, rank=0, world_size=1, batch_size=256, limit=args.max_blocks,
                       decode=lambda s, i: {"input_ids": decode_token_block(s, args.seq_len)})
    blocks = torch.cat([b["input_ids"] for b in raw]).numpy()
    return source, manifest, load_tokenizer(manifest), blocks


def build_models(args, manifest, device):
    """(sslscale's ``MLMObjective``, the baseline ``BertForMaskedLM`` with the same weights)."""
    from sslscale.config import load_config
    from sslscale.objectives.mlm import MLMObjective

    overrides = [f"data.train_shards={manifest.root}", f"model.vocab_size={args.vocab}",
                 f"model.hidden_size={args.hidden}", f"model.num_hidden_layers={args.layers}",
                 f"model.num_attention_heads={max(1, args.hidden // 64)}",
                 f"model.intermediate_size={4 * args.hidden}",
                 f"model.max_position_embeddings={args.seq_len}"]
    cfg = load_config(None, ["objective.name=mlm", *overrides])
    torch.manual_seed(0)
    ours = MLMObjective(cfg).to(device)
    baseline = BertForMaskedLM(ours.model.config).to(device)
    baseline.load_state_dict(ours.model.state_dict())
    return cfg, ours, baseline


class Side:
    """One side: ``make_batch(index) -> batch`` (collation + masking) and a training step."""

    def __init__(self, label: str, model, make_batch, loss_fn, device):
        self.label, self.model, self.make_batch = label, model, make_batch
        self.loss_fn, self.device = loss_fn, device
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        self.rates: list[float] = []
        self.note = ""

    def step(self, index: int) -> None:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in self.make_batch(index).items()}
        self.loss_fn(batch).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def window(self, indices, steps: int, tokens_per_step: int) -> None:
        """Time ``steps`` steps; appends tokens/s (synchronizing CUDA at both ends)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            self.step(next(indices))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.rates.append(steps * tokens_per_step / (time.perf_counter() - start))


def make_sides(args, manifest, tokenizer, blocks, device) -> tuple[Side, Side]:
    """(baseline, sslscale); batch ``i`` takes blocks ``[i*B, (i+1)*B)`` (mod the corpus)."""
    from sslscale.data.masking import MLMDecoder
    from sslscale.data.stream import collate
    from sslscale.data.text import TOKENS_MEMBER, encode_npy

    cfg, ours, baseline = build_models(args, manifest, device)
    decoder = MLMDecoder.from_config(cfg, manifest)
    special = decoder.special
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, mask_replace_prob=0.8,
                                               random_replace_prob=0.1, return_tensors="pt")
    n = len(blocks) // args.batch
    # run_mlm.py's tokenized dataset: lists of ids with their special_tokens_mask (made once)
    examples = [{"input_ids": ids.tolist(), "special_tokens_mask": np.isin(ids, special).astype(int).tolist()}
                for ids in blocks[:n * args.batch]]
    # sslscale's shards: each block as the .npy bytes of its stored dtype (made once)
    stored = np.dtype(manifest.meta["dtype"])
    samples = [{"__key__": f"{j:08d}", TOKENS_MEMBER: encode_npy(ids.astype(stored))}
               for j, ids in enumerate(blocks[:n * args.batch])]

    def hf_batch(i: int) -> dict:
        k = (i % n) * args.batch
        return dict(collator(examples[k:k + args.batch]))

    def our_batch(i: int) -> dict:
        k = (i % n) * args.batch
        batch = collate([decoder(samples[j], j) for j in range(k, k + args.batch)])
        del batch["sample_seeds"]  # the trainer moves it too; the objective does not read it
        return batch

    mine = Side("sslscale MLMDecoder + collate + MLMObjective", ours, our_batch,
                lambda b: ours(b).loss, device)
    first = our_batch(0)["masked_labels"]
    mine.note = (f"sslscale prediction slots: K = {decoder.max_predictions} per block, "
                 f"{(first != -100).sum().item() / len(first):.1f} filled on average (first batch)")
    return (Side("HF BertForMaskedLM + DataCollatorForLanguageModeling", baseline, hf_batch,
                 lambda b: baseline(**b).loss, device), mine)


def loss_check(base: Side, mine: Side) -> float:
    """|HF loss - sslscale loss| of the initial weights on one sslscale-masked batch, dropout off:
    the same objective computed with the full head and the masked-only head."""
    batch = {k: v.to(mine.device) for k, v in mine.make_batch(0).items()}
    try:
        with torch.no_grad():
            base.model.eval(), mine.model.eval()
            hf = base.loss_fn({"input_ids": batch["input_ids"], "labels": batch["labels"]})
            return abs(float(hf) - float(mine.loss_fn(batch)))
    finally:
        base.model.train(), mine.model.train()


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="tiny sizes: checks that it runs (CI)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=BERT_VOCAB)
    parser.add_argument("--batch", type=int, default=32, help="blocks per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--windows", type=int, default=9, help="timed windows per side")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed window")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--max-blocks", type=int, default=8192, help="blocks read from the corpus")
    args = parser.parse_args()
    if args.short:
        args.hidden, args.layers, args.vocab, args.batch, args.max_blocks = 64, 1, 1000, 8, 256
        args.windows, args.steps, args.warmup = 2, 1, 1
    print(f"load average at start: {os.getloadavg()}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        source, manifest, tokenizer, blocks = prepare(args, tmp)
        base, mine = make_sides(args, manifest, tokenizer, blocks, device)
    print(f"MLM step, {source}: {len(blocks)} packed blocks of {args.seq_len} tokens, tokenizer "
          f"{len(tokenizer)} tokens, model vocabulary {args.vocab}; BERT hidden {args.hidden} x "
          f"{args.layers} layers, batch {args.batch} blocks, {device}, {torch.get_num_threads()} threads, "
          f"attention {base.model.config._attn_implementation} / {mine.model.model.config._attn_implementation}")
    print(f"  {mine.note}")
    print(f"  loss check (initial weights, one batch): |HF - sslscale| = {loss_check(base, mine):.2e}")
    indices = {side: itertools.count() for side in (base, mine)}
    for side in (base, mine):
        for _ in range(args.warmup):
            side.step(next(indices[side]))
    tokens = args.batch * args.seq_len
    for w in range(args.windows):  # interleaved, order flipped per pair: AB BA AB ...
        for side in ((base, mine) if w % 2 == 0 else (mine, base)):
            side.window(indices[side], args.steps, tokens)
    pairs = [m / b for b, m in zip(base.rates, mine.rates)]
    for side in (base, mine):
        print(f"  {side.label:55s} {spread(side.rates):>26s} tokens/s")
    verdict = "met" if statistics.median(pairs) >= 1.5 else "NOT met"
    print(f"  ratio sslscale / HF per window pair: {spread(pairs, '{:.2f}')}x "
          f"(ratio of medians {statistics.median(mine.rates) / statistics.median(base.rates):.2f}x; "
          f"goal >= 1.5x on CPU: {verdict})")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
