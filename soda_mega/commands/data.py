"""``soda-mega data ACTION``: build, demo (and inspect) SODA token datasets.

Each action is a ``register_<action>(actions) -> parser`` function below that sets
``_data_run`` on its parser; :data:`ACTIONS` lists them in ``--help`` order. A new action
(``inspect``) is added by writing its register function and appending it to :data:`ACTIONS`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from soda_mega.commands.show_config import add_config_arguments
from soda_mega.config import load_config
from soda_mega.errors import EXIT_USER_ERROR

BUILD_EPILOG = """\
inputs:
  --manifest FILE  JSONL, one recording per line:
                   {"id": ..., "audio": "rel/path.wav", "transcript": "..."}  or
                   {"audio": ..., "segments": [{"start": 0.0, "end": 2.1, "text": "..."}, ...]}  or
                   {"codes": "rel/codes.npy", ...}  (pre-encoded [K, T] Mimi codes, no codec run);
                   paths are relative to the manifest. Builds a "speech" dataset.
  --text FILE      .jsonl ({"text": ..., "id": optional} per line) or plain UTF-8 text (one
                   document per blank-line-separated paragraph; --data.text_split=line for one
                   per line). Builds a "text" dataset.
  --s2st FILE      JSONL, one speech-to-speech translation pair per line (fine-tuning data):
                   {"id": ..., "source_audio": "en/1.wav", "source_text": "...",
                    "target_text": "...", "target_audio": "fr/1.wav"}
                   (or "source_codes" / "target_codes": pre-encoded .npy codes). Builds an "s2st"
                   dataset: one document per pair, BOS <|audio_start|> source audio <|audio_end|>
                   <|text_start|> source text <|text_end|> <|text_start|> target text <|text_end|>
                   <|audio_start|> target audio <|audio_end|> EOS, with the source part (up to
                   the target's <|text_start|>) masked out of the loss. Fine-tune on it with
                   launchers/configs/s2st-finetune.yaml and --training.init_from=CHECKPOINT.
  --hf-dataset PATH  a local Hugging Face dataset of recordings with transcripts: a save_to_disk
                   folder, a .parquet / .arrow file, a folder of them (a downloaded hub snapshot),
                   or a hub name (OWNER/NAME) whose snapshot is in the hub cache;
                   --audio-column (default audio), --text-column (default text), --id-column
                   (default: "id" if present, else <dataset>/<row>), --split (of a DatasetDict,
                   default train), --recording-column / --speaker-column (the split keys, below).
                   Needs `pip install datasets`; never downloads. Builds "speech".
  --lhotse CUTS    a Lhotse cut manifest (cuts.jsonl.gz), or --lhotse-recordings R
                   --lhotse-supervisions S; supervisions with text are the transcript segments, a
                   cut of a longer recording is read as that part only. Needs `pip install lhotse`.
                   Builds "speech".
output: OUT/train and OUT/valid (MDS shards with xxh64 hashes, soda_meta.json, doc_lengths.npy).
splits: by a hash of each record's recording, so all segments of a recording land in one split:
a manifest line's "recording_id" (else its audio or codes path), a Lhotse cut's recording, a
--recording-column value (else the row); --split-by speaker keeps speakers ("speaker" key,
Lhotse supervision speakers, --speaker-column) apart too. Text documents go by id.
OUT may be remote (s3://bucket/prefix, gs://, oci://, hf://: whatever mosaicml-streaming uploads
to; credentials and endpoint from its environment variables, e.g. S3_ENDPOINT_URL): shards are
staged in --staging DIR (default: a temporary folder) and uploaded as they are written.
An interrupted build resumes when rerun with the same command.
many machines: run the same command with --part I/N on N machines (or as a SLURM job array:
SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT choose the part; launchers/data_build.sbatch); each
builds every N-th work unit into the same OUT, the last to finish merges (or run
`soda-mega data build --finalize OUT`). The result equals a one-machine build byte for byte.
GPUs: the codec runs on every visible GPU (one codec worker each, fed by CPU processes that
decode and resample audio); --data.codec_devices=[cuda:0,cuda:1] chooses them. Bad records are reported, counted in
soda_meta.json "skipped", and left out: unreadable audio (whatever the decoder raises), sample
rates outside 8-384 kHz, more decoded audio than --data.max_record_audio_bytes, segments past
the end of their audio, Lhotse cuts outside their recording. Build settings are the data.* config fields (see
`soda-mega config --fields`), e.g. --data.valid_fraction=0.02 --data.doc_types=[audio_first,speech_only].
The embedded demo corpus (espeak-ng speech + a shipped text corpus): `soda-mega data demo OUT`.
"""

DEMO_EPILOG = """\
Builds OUT/speech (espeak-ng speech of the shipped sentences, several voices and speeds, three
sentences per recording, encoded with Mimi: random init unless --mimi-weights) and OUT/text
(the shipped text corpus), each with train/valid splits, using the tiny preset's vocabulary
unless --config/--preset say otherwise. Without espeak-ng it says so and uses the few WAV
files shipped in the repo. The synthesised audio and its manifest stay in OUT/sources.
"""


def _shorthands(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mimi-weights", metavar="PATH",
                   help="local Mimi weights (= --data.mimi_weights=PATH); without: random init, marked")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="local HuggingFace tokenizer.json (= --data.tokenizer=PATH); without: byte-level")
    p.add_argument("--workers", type=int, metavar="N",
                   help="worker processes of the CPU path (= --data.build_workers=N; 0 = in this process); "
                        "with GPUs, one codec worker per GPU instead")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a folder that holds another build instead of refusing")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _overrides(args) -> list[str]:
    overrides = list(args.overrides)
    if args.mimi_weights:
        overrides.append(f"--data.mimi_weights={args.mimi_weights}")
    if args.tokenizer:
        overrides.append(f"--data.tokenizer={args.tokenizer}")
    if args.workers is not None:
        overrides.append(f"--data.build_workers={args.workers}")
    return overrides


def _print_results(args, results) -> None:
    from soda_mega.data.write.builder import result_dict, summary_lines

    if args.json:
        print(json.dumps([result_dict(r) for r in results], indent=2))
        return
    for r in results:
        print("\n".join(summary_lines(r)))


# ----------------------------------------------------------------- data build
def register_build(actions) -> argparse.ArgumentParser:
    p = actions.add_parser(
        "build", help="audio manifests or text corpora -> SODA documents in MDS shards",
        description="Encode recordings with Mimi (or take pre-encoded codes), tokenize text, build "
                    "SODA documents (audio-first / text-first interleaving, speech-only, semantic-only, "
                    "text-only, or speech-to-speech translation pairs for fine-tuning) and write them "
                    "as MDS shards with train/valid splits.",
        epilog=BUILD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT", help="dataset folder or remote prefix (s3://...) to create or resume")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--manifest", action="append", metavar="FILE",
                       help="recording manifest (JSONL); repeat for several")
    group.add_argument("--text", action="append", metavar="FILE",
                       help="text corpus (.jsonl or plain text); repeat for several")
    group.add_argument("--s2st", action="append", metavar="FILE",
                       help="speech-to-speech translation pair manifest (JSONL); repeat for several")
    group.add_argument("--hf-dataset", action="append", metavar="PATH",
                       help="local Hugging Face dataset (save_to_disk folder, .parquet/.arrow files, or "
                            "a hub name already in the hub cache) of recordings with transcripts; "
                            "repeat for several")
    group.add_argument("--lhotse", action="append", metavar="CUTS",
                       help="Lhotse cut manifest (cuts.jsonl.gz); repeat for several")
    group.add_argument("--lhotse-recordings", metavar="FILE",
                       help="Lhotse recording manifest (with --lhotse-supervisions): one cut per recording")
    group.add_argument("--finalize", action="store_true",
                       help="only merge OUT (index, lengths, metadata) once every part has built its units; "
                            "needs no inputs")
    p.add_argument("--lhotse-supervisions", metavar="FILE",
                   help="Lhotse supervision manifest: the transcripts of --lhotse-recordings")
    p.add_argument("--audio-column", metavar="C",
                   help="--hf-dataset: the column holding the audio (default: audio)")
    p.add_argument("--text-column", metavar="C",
                   help="--hf-dataset: the column holding the transcript (default: text)")
    p.add_argument("--id-column", metavar="C",
                   help="--hf-dataset: the column of unique record ids (default: id when present, "
                        "else <dataset>/<row>)")
    p.add_argument("--split", metavar="S",
                   help="--hf-dataset: the split of a DatasetDict to read (default: train)")
    p.add_argument("--recording-column", metavar="C",
                   help="--hf-dataset: the column naming each row's recording (rows cut from one "
                        "recording stay in one split; default: each row is its own recording)")
    p.add_argument("--speaker-column", metavar="C",
                   help="--hf-dataset: the column naming each row's speaker (for --split-by speaker)")
    p.add_argument("--split-by", choices=("recording", "speaker"),
                   help="what never appears in both train and valid (= --data.split_by; default: recording)")
    p.add_argument("--part", metavar="I/N",
                   help="build only part I of N (0 <= I < N: every N-th work unit from I) into the shared "
                        "OUT; default: SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT inside a job array, "
                        "else the whole build")
    p.add_argument("--staging", metavar="DIR",
                   help="local folder shards pass through on their way to a remote OUT (default: a "
                        "temporary folder, removed at the end)")
    add_config_arguments(p)
    _shorthands(p)
    p.set_defaults(_data_run=run_build)
    return p


def run_build(args) -> int:
    from soda_mega.data.write.builder import BuildError, build_dataset, finalize_dataset, parse_part, part_from_env

    inputs = [(k, v) for k, v in (("speech", args.manifest), ("text", args.text), ("s2st", args.s2st)) if v]
    try:
        part = parse_part(args.part) if args.part else part_from_env()
    except BuildError as err:
        print(f"soda-mega data build: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.lhotse_supervisions and not args.lhotse_recordings:
        print("soda-mega data build: --lhotse-supervisions goes with --lhotse-recordings", file=sys.stderr)
        return EXIT_USER_ERROR
    hf_flags = [f"--{k.replace('_', '-')}" for k in ("audio_column", "text_column", "id_column", "split",
                                                      "recording_column", "speaker_column")
                if getattr(args, k) is not None]
    if hf_flags and not args.hf_dataset:
        print(f"soda-mega data build: {', '.join(hf_flags)} only apply to --hf-dataset", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.hf_dataset or args.lhotse or args.lhotse_recordings:
        inputs = [("speech", _recording_sources(args))]  # SourceError (exit 2) names a bad one
    if not args.finalize and not inputs:
        print("soda-mega data build: give inputs (--manifest, --text, --s2st FILE, --hf-dataset PATH or "
              "--lhotse CUTS), or --finalize OUT", file=sys.stderr)
        return 2
    try:
        if args.finalize:
            result = finalize_dataset(args.out, staging=args.staging, show_progress=not args.quiet)
        else:
            split_by = [f"--data.split_by={args.split_by}"] if args.split_by else []
            cfg = load_config(args.config, args.preset, _overrides(args) + split_by)
            kind, files = inputs[0]
            result = build_dataset(args.out, files, kind, cfg, overwrite=args.overwrite,
                                   show_progress=not args.quiet, part=part, staging=args.staging)
    except BuildError as err:
        print(f"soda-mega data build: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\nsoda-mega data build: interrupted; finished work units are kept, rerun the same "
              "command to resume", file=sys.stderr)
        return 130
    _print_results(args, [result])
    return 0


def _recording_sources(args) -> list:
    """The Hugging Face datasets or Lhotse manifests of the command line, as build inputs."""
    if args.hf_dataset:
        from soda_mega.data.write.hf_input import HFSource

        if args.quiet:  # the library's own bars (parquet -> arrow conversion), here and in workers
            os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
            if "datasets" in sys.modules:
                sys.modules["datasets"].disable_progress_bars()

        sources = [HFSource(path, audio_column=args.audio_column or "audio",
                            text_column=args.text_column or "text", id_column=args.id_column,
                            recording_column=args.recording_column, speaker_column=args.speaker_column,
                            split=args.split) for path in args.hf_dataset]
        for source in sources:
            if source.hub_name and not args.quiet:
                print(f"[soda-mega data] {source.hub_name}: the local copy in the hub cache, "
                      f"{source.path}", file=sys.stderr)
        return sources
    from soda_mega.data.write.lhotse_input import LhotseSource

    if args.lhotse_recordings:
        return [LhotseSource(recordings=args.lhotse_recordings, supervisions=args.lhotse_supervisions)]
    return [LhotseSource(cuts=path) for path in args.lhotse]


# ----------------------------------------------------------------- data plan
def register_plan(actions) -> argparse.ArgumentParser:
    p = actions.add_parser(
        "plan", help="wall time and GPU-hours of a build, from measured codec rates",
        description="Project the wall time, GPU-hours and CPU feeders of `data build` for H hours of "
                    "audio on G GPUs from a benchmarks/bench_codec.py result (measured on a GPU; no GPU "
                    "rate is ever assumed).")
    p.add_argument("--hours", type=float, required=True, metavar="H", help="hours of audio to encode")
    p.add_argument("--gpus", type=int, required=True, metavar="G", help="GPUs running the codec")
    p.add_argument("--bench", metavar="FILE",
                   help="bench_codec JSON (python benchmarks/bench_codec.py on a GPU writes "
                        "benchmarks/results/bench_codec_cuda.json)")
    p.add_argument("--cpus-per-gpu", type=int, metavar="N",
                   help="CPU cores per GPU on the build nodes: caps the rate by the measured feeder rate")
    p.add_argument("--num-codebooks", type=int, metavar="K", help="codebooks per frame for the token count "
                                                                   "(default: the benchmark's)")
    p.add_argument("--json", action="store_true", help="print the projection as JSON")
    p.set_defaults(_data_run=run_plan)
    return p


def run_plan(args) -> int:
    from soda_mega.data.write.throughput import ThroughputError, load_rates, plan_lines, project

    if not args.bench:
        print("soda-mega data plan: needs measured rates: run `python benchmarks/bench_codec.py` on a GPU "
              "and pass its JSON with --bench FILE (no GPU rate is assumed)", file=sys.stderr)
        return 2
    try:
        proj = project(load_rates(args.bench), args.hours, args.gpus, cpus_per_gpu=args.cpus_per_gpu,
                       num_codebooks=args.num_codebooks)
    except ThroughputError as err:
        print(f"soda-mega data plan: {err}", file=sys.stderr)
        return 2
    print(json.dumps(proj, indent=2) if args.json else "\n".join(plan_lines(proj, args.bench)))
    return 0


# ----------------------------------------------------------------- data demo
def register_demo(actions) -> argparse.ArgumentParser:
    p = actions.add_parser(
        "demo", help="build the embedded demo corpus (espeak-ng speech + shipped text)",
        description="One command, any machine: synthesise the shipped sentences with espeak-ng and "
                    "build the speech and text demo datasets.",
        epilog=DEMO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT", help="folder for OUT/speech, OUT/text and OUT/sources")
    add_config_arguments(p)
    _shorthands(p)
    p.add_argument("--limit", type=int, metavar="N", help="use only the first N sentences (quick runs)")
    p.add_argument("--no-espeak", action="store_true",
                   help="use the shipped WAV files even when espeak-ng is installed")
    p.set_defaults(_data_run=run_demo)
    return p


def run_demo(args) -> int:
    from soda_mega.data.write.builder import BuildError
    from soda_mega.data.write.demo import build_demo, demo_config

    cfg = demo_config(args.config, args.preset, _overrides(args))
    try:
        results = build_demo(args.out, cfg, overwrite=args.overwrite, limit=args.limit,
                             use_espeak=not args.no_espeak, show_progress=not args.quiet)
    except BuildError as err:
        print(f"soda-mega data demo: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\nsoda-mega data demo: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    _print_results(args, results)
    return 0


# ----------------------------------------------------------------- registry
# `data inspect` (soda_mega/data/read/inspect.py) registers here: append its register function.
def register_inspect(actions) -> argparse.ArgumentParser:
    p = actions.add_parser(
        "inspect", help="counts per modality and document type, hours, one document shown",
        description="Summarise a built dataset (both splits) and show one document as decoded "
                    "text, special tokens and audio spans plus its token ids; --wav decodes the "
                    "document's first audio span back to audio with the dataset's codec.")
    p.add_argument("path", metavar="PATH", help="dataset root (holding train/ and valid/); a local "
                   "folder or a remote URL (s3://, gs://, oci://, hf://)")
    p.add_argument("--sample", type=int, default=0, metavar="I", help="document index to show")
    p.add_argument("--split", default="train", choices=("train", "valid"))
    p.add_argument("--wav", metavar="FILE", help="write the first audio span as a 24 kHz WAV")
    p.add_argument("--mimi-weights", metavar="PATH",
                   help="Mimi weights (.safetensors) for --wav; required when the dataset records "
                        "weights (they are printed, never loaded unasked); without: the dataset's "
                        "seeded random Mimi")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="the text tokenizer.json that decodes the shown document's text (an hf "
                        "dataset records its builder's path: printed and compared, never opened "
                        "unasked); without: text shown as ids")
    p.add_argument("--verify", action="store_true",
                   help="read every shard and document of both splits: shard hashes (when the "
                        "index has them), token ids inside the vocabulary layout, loss masks in "
                        "{0,1}, lengths; names each damaged shard or document and exits with 2 "
                        "if any")
    p.set_defaults(_data_run=run_inspect)
    return p


def run_inspect(args) -> int:
    from soda_mega.data.read.inspect import inspect_dataset
    from soda_mega.data.read.source import DatasetError
    from soda_mega.utils.terminal import printable

    # The split's budget may be raised on the command line (--data.max_dataset_bytes=...).
    data_cfg = load_config(overrides=args.overrides).data
    budget = dict(max_bytes=data_cfg.max_dataset_bytes, max_inflate_ratio=data_cfg.max_inflate_ratio)
    if args.verify:
        from soda_mega.data.read.inspect import verify_dataset

        report, problems = verify_dataset(args.path, budget=budget)
        print(report)
        return 2 if problems else 0
    try:
        print(inspect_dataset(args.path, sample=args.sample, split=args.split, wav=args.wav,
                              mimi_weights=args.mimi_weights, budget=budget,
                              tokenizer=args.tokenizer))
    except DatasetError as err:
        print(f"soda-mega data inspect: {printable(err)}", file=sys.stderr)
        return 2
    return 0


ACTIONS = [register_build, register_plan, register_demo, register_inspect]


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("data", help="build (and inspect) SODA token datasets",
                       description="Build SODA token datasets: MDS shards of interleaved audio/text "
                                   "documents with train/valid splits.")
    actions = p.add_subparsers(dest="data_action", metavar="ACTION")
    actions.required = True
    for register_action in ACTIONS:
        register_action(actions)
    return p


def run(args) -> int:
    return int(args._data_run(args) or 0)
