"""``soda-mega eval pairs CKPT MANIFEST``: sWUGGY / sBLIMP / Salmon-style likelihood pairs."""

from __future__ import annotations

from soda_mega.commands.eval_common import add_model_arguments, add_output_arguments, emit, load

EPILOG = """\
MANIFEST is JSONL, one pair per line, audio paths relative to it (.npy pre-encoded [K, T]
codes also accepted):
  {"id": "w001", "positive": "real/w001.wav", "negative": "fake/w001.wav"}
Each recording is scored by the mean log-prob of its audio ids in
BOS <|audio_start|> audio <|audio_end|>; an item is correct when the positive one scores higher.
The benchmark audio is not shipped with soda-mega: use your local copy.
"""


def register(tasks):
    p = tasks.add_parser("pairs", help="likelihood pairs (sWUGGY, sBLIMP, Salmon): accuracy with a 95%% interval",
                         description="Score (positive, negative) recording pairs by the mean log-prob of their "
                                     "audio tokens; report accuracy with a 95%% Wilson interval.", epilog=EPILOG,
                         formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("manifest", metavar="MANIFEST", help="JSONL of positive/negative audio pairs")
    add_output_arguments(p)
    return p


def run(args) -> int:
    from soda_mega.eval.pairs import evaluate_pairs, load_pairs

    decoder, speech, path = load(args)
    pairs, manifest = load_pairs(args.manifest, speech, decoder.cfg.model.seq_length, args.skip_bad)
    results, summary = evaluate_pairs(decoder, pairs, args.batch_size)
    summary["skipped"] = len(manifest.skipped)
    lo, hi = summary["ci95"]
    md = (f"# Likelihood pairs: {args.manifest}\n\ncheckpoint `{path}`\n\n"
          f"| items | correct | ties | accuracy | 95% interval | skipped |\n|---|---|---|---|---|---|\n"
          f"| {summary['n']} | {summary['correct']} | {summary['ties']} | {summary['accuracy']:.4f} | "
          f"[{lo:.4f}, {hi:.4f}] | {summary['skipped']} |\n")
    items = [{"id": r.id, "positive_logprob": r.positive, "negative_logprob": r.negative,
              "correct": r.correct} for r in results]
    emit(args, "pairs", summary, items, md,
         {"checkpoint": str(path), "manifest": str(args.manifest), "skipped_items": manifest.skipped})
    return 0
