"""MLM training-step throughput: sslscale's path vs Hugging Face's usual one, same model, same process.

Baseline (transformers' ``run_mlm.py --line_by_line`` style): batches of the corpus's real lines
(paragraphs), each truncated to ``seq_len`` and padded to the longest in its batch, 15% masked
with ``DataCollatorForLanguageModeling``, ``BertForMaskedLM(input_ids, attention_mask, labels)``
computing logits for every position. sslscale: fixed ``[CLS] ... [SEP]`` blocks of ``seq_len``
tokens (no padding) masked by ``MLMDecoder``, the head on masked positions only. Both: the same
BERT size, AdamW, forward + backward + step. The unit is **non-pad tokens per second**; timed
windows alternate between the two and the medians are compared.

    python bench/mlm_step.py [--short] [--hidden 256 --layers 4 --batch 32 --seq-len 128]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling


def corpus_lines(tokenizer, texts: list[str], seq_len: int) -> list[list[int]]:
    """The corpus's non-empty lines tokenized (with [CLS]/[SEP]), truncated to ``seq_len``."""
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    return [ids for ids in tokenizer(lines, truncation=True, max_length=seq_len)["input_ids"] if len(ids) > 2]


def window(step, batches, steps: int) -> float:
    """Non-pad tokens per second over ``steps`` training steps."""
    tokens, start = 0, time.perf_counter()
    for _ in range(steps):
        tokens += step(next(batches))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="tiny sizes: checks that it runs (CI)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="steps per timed window")
    args = parser.parse_args()
    if args.short:
        args.hidden, args.layers, args.batch, args.windows, args.steps = 64, 1, 8, 2, 2

    from sslscale.config import load_config
    from sslscale.data.sources import open_text_source
    from sslscale.data.shards import load_manifest
    from sslscale.data.stream import decoder_for, eval_batches
    from sslscale.data.text import load_tokenizer, prepare_text
    from sslscale.objectives.mlm import MLMObjective

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path("/usr/share/doc/python3.11/html/_sources")
        source = "text" if docs.is_dir() and not args.short else "pydoc-topics"
        prepare_text(source, tmp, seq_len=args.seq_len, val_fraction=0.0, vocab_size=8192)
        manifest = load_manifest(Path(tmp) / "train")
        tokenizer = load_tokenizer(manifest)
        texts = [d.text for d in open_text_source(source).documents]
        lines = corpus_lines(tokenizer, texts, args.seq_len)
        overrides = [f"data.train_shards={tmp}/train", f"model.hidden_size={args.hidden}",
                     f"model.num_hidden_layers={args.layers}", f"model.num_attention_heads={max(1, args.hidden // 64)}",
                     f"model.intermediate_size={4 * args.hidden}", f"model.max_position_embeddings={args.seq_len}"]
        cfg = load_config(None, ["objective.name=mlm", *overrides])
        blocks = list(eval_batches(manifest, rank=0, world_size=1, batch_size=args.batch,
                                   decode=decoder_for(cfg, manifest)))
        ours = MLMObjective(cfg).to(device)
        baseline = BertForMaskedLM(BertConfig(**ours.model.config.to_dict())).to(device)
        baseline.load_state_dict(ours.model.state_dict())
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, return_tensors="pt")

    def endless(items):
        while True:
            yield from items

    def padded_batches():
        g = torch.Generator().manual_seed(0)
        while True:
            idx = torch.randint(len(lines), (args.batch,), generator=g).tolist()
            yield collator([{"input_ids": lines[i]} for i in idx])

    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_base = torch.optim.AdamW(baseline.parameters(), lr=1e-4)

    def step_ours(batch) -> int:
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "labels")}
        ours(batch).loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return batch["input_ids"].numel()

    def step_base(batch) -> int:
        batch = {k: v.to(device) for k, v in batch.items()}
        baseline(**batch).loss.backward()
        opt_base.step()
        opt_base.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum())

    ours_it, base_it = endless(blocks), padded_batches()
    window(step_base, base_it, 1), window(step_ours, ours_it, 1)  # warm-up
    ours_rates, base_rates = [], []
    for _ in range(args.windows):  # interleaved windows: both see the same machine state
        base_rates.append(window(step_base, base_it, args.steps))
        ours_rates.append(window(step_ours, ours_it, args.steps))
    base, mine = statistics.median(base_rates), statistics.median(ours_rates)
    mean_len = sum(len(x) for x in lines) / len(lines)
    print(f"MLM step, {source} ({len(lines)} lines, mean {mean_len:.0f} tokens; blocks of {args.seq_len}), "
          f"BERT hidden {args.hidden} x {args.layers} layers, batch {args.batch}, {device}")
    print(f"  HF baseline (padded lines, full-vocabulary logits): {base:9.0f} non-pad tokens/s")
    print(f"  sslscale (packed blocks, masked-only head):          {mine:9.0f} non-pad tokens/s")
    print(f"  ratio: {mine / base:.2f}x")


if __name__ == "__main__":
    main()
