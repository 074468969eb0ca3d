"""``soda-mega eval asr | tts | speech | make-tasks``: SODA's ASR and TTS protocols.

``asr`` and ``tts`` run one protocol over a manifest; ``speech`` runs both and writes one
report; ``make-tasks`` cuts a speech manifest with segments (e.g. the demo corpus) into the
manifests these tasks and ``eval pairs`` read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from soda_mega.commands.eval_common import add_model_arguments, add_output_arguments, emit, load

MANIFEST_EPILOG = """\
MANIFEST is JSONL, one utterance per line, audio paths relative to it:
  {"id": "u1", "audio": "u1.wav", "text": "the transcript"}
TTS items may name their own voice prompt: "prompt_audio": "p.wav", "prompt_text": "...";
without one, another utterance of the manifest (with a different text) is the prompt.
WER is corpus-level over lowercased, punctuation-free text (jiwer). `soda-mega eval make-tasks`
builds such a manifest from a speech manifest with segments, e.g. the demo corpus.
"""


def _asr_arguments(p) -> None:
    p.add_argument("--shots", type=int, default=3, metavar="N",
                   help="ASR examples in each prompt, drawn (seeded) from the manifest, never the "
                        "item itself nor another recording of its text (default 3)")
    p.add_argument("--asr-max-new-tokens", type=int, default=256, metavar="N",
                   help="most text tokens of one transcript (default 256)")


def _tts_arguments(p) -> None:
    p.add_argument("--temperature", type=float, default=0.9, help="TTS sampling temperature (SODA: 0.9)")
    p.add_argument("--top-p", type=float, default=0.8, help="TTS nucleus sampling mass (SODA: 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="TTS top-k cut (0 = none)")
    p.add_argument("--tts-max-new-tokens", type=int, default=1500, metavar="N",
                   help="most audio tokens of one synthesis (SODA: 1500 = 15 s)")
    p.add_argument("--asr", default="self", metavar="self|MODULE:ATTR",
                   help="transcriber that scores TTS: 'self' (this checkpoint in N-shot ASR mode, "
                        "--shots examples) or an importable object/factory with transcribe(paths)")


def _parser(tasks, name: str, help_: str, asr: bool, tts: bool):
    p = tasks.add_parser(name, help=help_, description=help_ + ".", epilog=MANIFEST_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("manifest", metavar="MANIFEST", help="JSONL of utterances (audio, text)")
    if asr or tts:
        _asr_arguments(p)
    if tts:
        _tts_arguments(p)
    add_output_arguments(p)
    return p


def register_asr(tasks):
    return _parser(tasks, "asr", "N-shot ASR with the model itself, scored by WER", True, False)


def register_tts(tasks):
    return _parser(tasks, "tts", "zero-shot voice-prompted TTS: WAVs, and WER of an ASR on them", False, True)


def register_speech(tasks):
    return _parser(tasks, "speech", "ASR and TTS over one manifest, one report", True, True)


def register_make_tasks(tasks):
    p = tasks.add_parser(
        "make-tasks", help="cut a speech manifest with segments into eval manifests (utterances, pairs)",
        description="Cut every transcribed segment of a speech manifest (the `data build --manifest` "
                    "format, e.g. runs/demo-corpus/sources/manifest.jsonl) into OUT/audio/*.wav and "
                    "write OUT/utterances.jsonl (for eval asr/tts/speech) and OUT/pairs.jsonl (a "
                    "--pair-seconds window of each utterance against its time-reversed copy, for "
                    "eval pairs).")
    p.add_argument("manifest", metavar="MANIFEST")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--split", default="valid", choices=("all", "train", "valid"),
                   help="only recordings the data builder puts in this split (default valid: "
                        "held out from training)")
    p.add_argument("--valid-fraction", type=float, default=0.1,
                   help="the data.valid_fraction the corpus was built with (demo: 0.1)")
    p.add_argument("--split-by", default="recording", choices=("recording", "speaker"),
                   help="the data.split_by the corpus was built with (default recording)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N utterances")
    p.add_argument("--pair-seconds", type=float, default=1.0, metavar="S",
                   help="length of the pair items, cut from the middle of each utterance "
                        "(default 1.0 s: word-sized, like sWUGGY)")
    return p


# ---------------------------------------------------------------------------------- runs
def _asr(args, decoder, speech, utts) -> tuple[dict, list[dict], str]:
    from soda_mega.eval.asr import choose_shots, shots_for, transcribe_ids
    from soda_mega.eval.wer import item_wer, word_error_rate

    pool = choose_shots(utts, args.shots, args.seed)
    shots = [shots_for(u.id, u.text, pool, args.shots) for u in utts]
    print(f"[soda-mega eval] ASR: {len(utts)} utterances, {args.shots}-shot", file=sys.stderr, flush=True)
    hyps = transcribe_ids(decoder, speech, [u.audio for u in utts], shots, args.asr_max_new_tokens,
                          args.batch_size)
    wer = word_error_rate([u.text for u in utts], hyps)
    items = [{"task": "asr", "id": u.id, "reference": u.text, "hypothesis": h, "wer": item_wer(u.text, h),
              "shots": [s.id for s in sh]} for u, h, sh in zip(utts, hyps, shots)]
    summary = {"n": len(utts), "shots": args.shots, **wer.to_dict()}
    md = (f"## ASR ({args.shots}-shot, greedy)\n\n| utterances | WER | sub | del | ins | ref words |\n"
          f"|---|---|---|---|---|---|\n| {len(utts)} | {wer.wer:.4f} | {wer.substitutions} | "
          f"{wer.deletions} | {wer.insertions} | {wer.reference_words} |\n")
    return summary, items, md


def _tts(args, decoder, speech, utts) -> tuple[dict, list[dict], str]:
    from soda_mega.eval.asr import ModelASR, choose_shots, load_transcriber
    from soda_mega.eval.tts import synthesize, voice_prompts
    from soda_mega.eval.wer import item_wer, word_error_rate
    from soda_mega.inference.sampling import Sampling

    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    items = voice_prompts(utts, speech)
    wav_dir = Path(args.out) / "tts"
    print(f"[soda-mega eval] TTS: {len(items)} utterances -> {wav_dir}", file=sys.stderr, flush=True)
    results = synthesize(decoder, speech, items, wav_dir, sampling, args.tts_max_new_tokens,
                         args.seed, args.batch_size)
    if args.asr == "self":
        asr = ModelASR(decoder, speech, choose_shots(utts, args.shots, args.seed), args.shots,
                       args.asr_max_new_tokens, args.batch_size)
        hyps = asr.transcribe([r.wav for r in results], [(r.id, r.target_text) for r in results])
    else:
        hyps = list(load_transcriber(args.asr).transcribe([r.wav for r in results]))
    wer = word_error_rate([r.target_text for r in results], hyps)
    rows = [{"task": "tts", "id": r.id, "reference": r.target_text, "hypothesis": h,
             "wer": item_wer(r.target_text, h), "wav": str(r.wav), "seconds": r.seconds,
             "frames": r.frames, "stop_reason": r.stop_reason} for r, h in zip(results, hyps)]
    ended = sum(r.stop_reason == "stop_id" for r in results)
    summary = {"n": len(results), "asr": args.asr, "temperature": args.temperature, "top_p": args.top_p,
               "top_k": args.top_k, "max_new_tokens": args.tts_max_new_tokens,
               "ended_with_audio_end": ended, "mean_seconds": sum(r.seconds for r in results) / len(results),
               **wer.to_dict(), "speaker_similarity": None}
    md = (f"## TTS (zero-shot voice prompt; T={args.temperature}, top-p {args.top_p}; scored by "
          f"ASR '{args.asr}')\n\n| utterances | WER | ended with <\\|audio_end\\|> | mean length (s) |\n"
          f"|---|---|---|---|\n| {len(results)} | {wer.wer:.4f} | {ended} | {summary['mean_seconds']:.2f} |\n\n"
          "Speaker similarity is not computed (it needs a speaker-embedding model, not shipped).\n")
    return summary, rows, md


def _run(args, asr: bool, tts: bool) -> int:
    from soda_mega.eval.asr import load_utterances

    if tts and not args.out:
        raise SystemExit("soda-mega eval: TTS writes WAV files; give --out DIR")
    decoder, speech, path = load(args)
    utts, manifest = load_utterances(args.manifest, speech, args.skip_bad)
    summary, items, md = {}, [], f"# Speech evaluation: {args.manifest}\n\ncheckpoint `{path}`\n\n"
    for flag, fn, key in ((asr, _asr, "asr"), (tts, _tts, "tts")):
        if flag:
            s, rows, part = fn(args, decoder, speech, utts)
            summary[key], items, md = s, items + rows, md + part + "\n"
    summary["skipped"] = len(manifest.skipped)
    task = "speech" if asr and tts else ("asr" if asr else "tts")
    emit(args, task, summary, items, md, {"checkpoint": str(path), "manifest": str(args.manifest),
                                          "skipped_items": manifest.skipped})
    return 0


def run_asr(args) -> int:
    return _run(args, True, False)


def run_tts(args) -> int:
    return _run(args, False, True)


def run_speech(args) -> int:
    return _run(args, True, True)


def run_make_tasks(args) -> int:
    from soda_mega.eval.task_builder import build_tasks

    built = build_tasks(args.manifest, args.out, args.split, args.valid_fraction, args.limit,
                        pair_seconds=args.pair_seconds, split_by=args.split_by)
    for line in built.skipped:
        print(f"[soda-mega eval] skipped {line}", file=sys.stderr)
    print(f"wrote {built.count} utterances: {built.utterances} and {built.pairs}")
    return 0
