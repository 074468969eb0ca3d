"""``soda-mega translate CKPT AUDIO... --out DIR``: speech-to-speech translation (SODA_SPEC 6).

The checkpoint is an S2ST fine-tune (``launchers/configs/s2st-finetune.yaml``), trained on
``BOS <|audio_start|> source audio <|audio_end|> <|text_start|> source text <|text_end|>
<|text_start|> target text <|text_end|> <|audio_start|> target audio <|audio_end|> EOS``.
Inference gives the source audio and lets the model write the rest; structure-aware decoding
forces exactly that span order (text, text, audio) and keeps every audio id in its codebook
slot, so the target audio always decodes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from soda_mega.commands.eval_common import add_model_arguments


def register(subparsers):
    p = subparsers.add_parser(
        "translate", help="speech-to-speech translation with an S2ST fine-tuned checkpoint",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("audio", nargs="+", metavar="AUDIO", help="source recordings (WAV/FLAC/..., or .npy codes)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="writes DIR/<name>.wav (target speech) and DIR/translations.jsonl")
    p.add_argument("--temperature", type=float, default=0.9, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=0.8, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=0, help="top-k cut (0 = none)")
    p.add_argument("--max-new-tokens", type=int, default=2000, metavar="N",
                   help="most generated tokens (both texts and the target audio; 100 audio tokens = 1 s)")
    p.add_argument("--max-text-tokens", type=int, default=256, metavar="N",
                   help="close a text span at this many tokens, so a model that loops in the "
                        "source or target text still reaches the target speech (default 256)")
    return p


def run(args) -> int:
    from soda_mega.commands.eval_common import load
    from soda_mega.data.read.inspect import write_wav
    from soda_mega.data.write.writer import atomic_write_text
    from soda_mega.eval.prompts import s2st_prompt
    from soda_mega.inference.generate import generate
    from soda_mega.inference.sampling import Sampling
    from soda_mega.inference.spans import split_spans

    decoder, speech, path = load(args)
    layout = decoder.layout
    sources = speech.audio_ids_many(args.audio, strict=True)
    prompts = [s2st_prompt(layout, ids) for ids in sources]
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    print(f"[soda-mega translate] {len(prompts)} recording(s) with {path}", file=sys.stderr, flush=True)
    gens = generate(decoder, prompts, args.max_new_tokens, sampling, plan=["text", "text", "audio"],
                    seed=args.seed, batch_size=args.batch_size, max_text_tokens=args.max_text_tokens)
    out = Path(args.out)
    rows = []
    for src, gen in zip(args.audio, gens):
        spans = split_spans(layout, gen.tokens)
        texts = [speech.text(ids) for kind, ids in spans if kind == "text"]
        audio = next((ids for kind, ids in spans if kind == "audio"), [])
        wav_path = out / f"{Path(src).stem}.wav"
        wav = speech.waveform(audio)
        write_wav(wav_path, wav, speech.sample_rate)
        complete = gen.stop_reason == "eos"
        rows.append({"source": str(src), "source_text": texts[0] if texts else "",
                     "target_text": texts[1] if len(texts) > 1 else "", "target_wav": str(wav_path),
                     "target_seconds": wav.numel() / speech.sample_rate, "complete": complete})
        print(f"{src}\n  source text: {rows[-1]['source_text']}\n  target text: {rows[-1]['target_text']}\n"
              f"  target audio: {wav_path} ({rows[-1]['target_seconds']:.2f} s)"
              + ("" if complete else f"  [cut at --max-new-tokens={args.max_new_tokens}]"))
    atomic_write_text(out / "translations.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return 0
