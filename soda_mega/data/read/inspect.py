"""``soda-mega data inspect``: what a built dataset holds, and one document made readable.

Reports per split: documents by type, tokens by modality, hours of audio, skipped inputs, the
codec (and loudly, whether its weights were random) and the vocabulary layout. One document
is shown as a sequence of spans: text decoded with the dataset's tokenizer, special tokens by
name, audio as frame counts per span, followed by its first token ids. With ``--wav`` the
document's first audio span is decoded back to a WAV file with the codec. ``--verify``
(:func:`verify_dataset`) reads every shard and document of both splits and names every
damaged one.
"""

from __future__ import annotations

import os
import sys
import wave
from pathlib import Path

import numpy as np
import torch

from soda_mega.data.read.cache import is_remote
from soda_mega.data.read.source import DatasetError, DocumentSource, EmptySplitError, MissingSplitError
from soda_mega.data.schema import SPLITS
from soda_mega.tokens.layout import Modality, VocabLayout
from soda_mega.utils.terminal import printable


def _tokenizer(meta: dict, named: str | None):
    """The tokenizer that decodes the shown document's text, and a note on it (or None).

    Byte-level datasets need no file. An ``hf`` dataset's text is decoded only with the
    tokenizer the user names (``--tokenizer``): the path ``soda_meta.json`` records comes with
    the dataset, so it is printed and compared, never opened (it could name any file of the
    user's, a FIFO or a file on a hung mount)."""
    from soda_mega.data.tokenizer import ByteTokenizer, HFTokenizer

    info = meta.get("tokenizer") or {}
    if named:
        tokenizer = HFTokenizer(named)
        recorded = info.get("sha256")
        if recorded and recorded != tokenizer.sha256:
            print(f"soda-mega data inspect: WARNING: --tokenizer {printable(named, 300)} (sha256 "
                  f"{tokenizer.sha256[:12]}...) is not the tokenizer the dataset was built with "
                  f"(sha256 {printable(recorded, 12)}...): the text shown may be wrong",
                  file=sys.stderr)
        return tokenizer, None
    if info.get("kind") == "byte":
        return ByteTokenizer(), None
    if info.get("kind") == "hf":
        return None, (f"text shown as ids: pass --tokenizer PATH (the dataset was built with "
                      f"{printable(info.get('path'), 300)}, which is never opened unasked)")
    return None, None


def spans(tokens: np.ndarray, layout: VocabLayout) -> list[tuple[str, np.ndarray]]:
    """Split a document into runs of one kind: ("text"|"audio"|"special", ids)."""
    mods = layout.modality(torch.from_numpy(tokens.astype(np.int64))).numpy()
    kinds = np.where(mods == Modality.TEXT, 0, np.where(mods == Modality.SPECIAL, 1, 2))
    out: list[tuple[str, np.ndarray]] = []
    start = 0
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or kinds[i] != kinds[start] or kinds[start] == 1:
            name = ("text", "special", "audio")[kinds[start]]
            out.append((name, tokens[start:i]))
            start = i
    return out


def _text_parts(ids: np.ndarray, layout: VocabLayout, tokenizer) -> list[str]:
    """A text span (BOS and EOS are text ids) as its text runs and markers, in document order."""
    marks = {layout.bos_id: "<BOS>", layout.eos_id: "<EOS>"}
    parts: list[str] = []
    body: list[int] = []
    for i in [*(int(i) for i in ids), None]:
        if i is not None and i not in marks:
            body.append(i)
            continue
        if body:
            parts.append(repr(tokenizer.decode(body) if tokenizer is not None else f"ids {body[:12]}..."))
            body = []
        if i is not None:
            parts.append(marks[i])
    return parts


def render_document(tokens: np.ndarray, layout: VocabLayout, tokenizer=None, max_ids: int = 48) -> str:
    """A one-document view: spans with decoded text / names / frame counts, then raw ids."""
    names = {layout.special_id(n): n for n in layout.special_tokens}
    parts = []
    for kind, ids in spans(tokens, layout):
        if kind == "special":
            parts.append(printable(names[int(ids[0])]))
        elif kind == "text":
            parts += _text_parts(ids, layout, tokenizer)
        else:
            cbs = layout.codebook_of(torch.from_numpy(ids.astype(np.int64)))
            used = sorted(set(cbs.tolist()))
            frames = len(ids) / max(len(used), 1)
            parts.append(f"[audio {frames:g} frames x codebooks {used[0]}..{used[-1]}]")
    shown = " ".join(str(int(i)) for i in tokens[:max_ids])
    more = f" ... ({len(tokens)} tokens)" if len(tokens) > max_ids else ""
    return " ".join(parts) + f"\n  ids: {shown}{more}"


def first_audio_codes(tokens: np.ndarray, layout: VocabLayout) -> torch.Tensor | None:
    """Codes ``[K, T]`` of the document's first audio span (whole frames only), or None."""
    for kind, ids in spans(tokens, layout):
        if kind == "audio":
            ids_t = torch.from_numpy(ids.astype(np.int64))
            k = len(set(layout.codebook_of(ids_t).tolist()))
            usable = len(ids) // k * k
            return layout.ids_to_codes(ids_t[:usable], num_codebooks=k)
    return None


def write_wav(path: Path, wav: torch.Tensor, sample_rate: int) -> None:
    """16-bit mono WAV, written aside and renamed (never a half-written file at ``path``)."""
    pcm = (wav.detach().float().clamp(-1, 1).numpy().reshape(-1) * 32767).astype(np.int16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with wave.open(str(tmp), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())
    os.replace(tmp, path)


def _decoder(root, codec: dict, mimi_weights: str | None, num_codebooks: int):
    """The Mimi that decodes a dataset's codes for ``--wav``.

    The weights file is the one the user names (``--mimi-weights``): a path recorded in
    ``soda_meta.json`` comes with the dataset, so it is printed and compared, never loaded
    unasked. A dataset of the seeded random Mimi is decoded with that same random Mimi."""
    from soda_mega.data.codec import CodecWeightsError, MimiCodec

    recorded = codec.get("weights")
    if mimi_weights is None and recorded:
        raise CodecWeightsError(
            f"{root}: its audio was encoded with the Mimi weights {str(recorded)[:300]!r} "
            f"(soda_meta.json codec.weights); soda-mega never loads a file a dataset names: pass "
            f"--mimi-weights PATH (that file, a .safetensors you trust) to decode it")
    seed = codec.get("seed", 0)
    model = MimiCodec(mimi_weights, num_codebooks=num_codebooks,
                      seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else 0)
    expected = codec.get("weights_sha256")
    if mimi_weights and expected and model.weights_sha256 != expected:
        print(f"soda-mega data inspect: WARNING: --mimi-weights {mimi_weights} (sha256 "
              f"{model.weights_sha256[:12]}...) are not the weights {root} was encoded with "
              f"(sha256 {printable(expected, 12)}...): expect noise", file=sys.stderr)
    return model


def inspect_dataset(root: str | Path, sample: int = 0, split: str = "train",
                    wav: str | Path | None = None, mimi_weights: str | None = None,
                    budget: dict | None = None, tokenizer: str | None = None) -> str:
    """The inspection report of the dataset at ``root`` (optionally writing one WAV; text decoded
    with ``tokenizer`` when given); ``budget``: :class:`DocumentSource`'s ``max_bytes`` /
    ``max_inflate_ratio`` (default: the defaults). Every string the dataset's metadata holds is
    shown escaped (:func:`~soda_mega.utils.terminal.printable`): one value, one line, no
    terminal codes."""
    root = str(root) if is_remote(str(root)) else Path(root)
    lines = [f"dataset {root}"]
    source = None
    for name in SPLITS:
        try:
            src = DocumentSource(root, name, **(budget or {}))
        except MissingSplitError as err:  # an empty split (EmptySplitError) too: nothing to show
            lines.append(f"  {name}: {'empty' if isinstance(err, EmptySplitError) else 'absent'} ({err})")
            continue
        # Any other DatasetError (a malformed split) ends the inspection, naming what is wrong.
        meta = src.meta
        tokens = meta["tokens"]
        lines.append(f"  {name}: {meta['num_docs']} documents, {tokens.get('total', 0):,} tokens, "
                     f"{meta['audio_hours']:.3f} h of audio, kind {meta['kind']}")
        lines.append("    documents: " + ", ".join(f"{printable(k)} {v}"
                                                   for k, v in meta["doc_types"].items()))
        lines.append("    tokens:    " + ", ".join(f"{printable(k)} {v:,}" for k, v in tokens.items()
                                                   if k != "total"))
        if meta["skipped"]:
            lines.append(f"    skipped inputs: {len(meta['skipped'])} (first: "
                         f"{printable(meta['skipped'][0], 500)})")
        if name == split:
            source = src
    if source is None:
        raise DatasetError(f"{root} has no {split!r} split to show a document from")
    meta = source.meta
    layout = VocabLayout.from_dict(meta["vocab_layout"])
    codec = meta.get("codec")
    if codec:
        random = codec.get("random_init")
        lines.append(f"  codec: {printable(codec.get('name'), 200)} {codec.get('num_codebooks')} "
                     f"codebooks x {codec.get('codebook_size')}, weights "
                     f"{printable(codec.get('weights') or 'none', 300)}"
                     + ("  *** RANDOM-INIT CODEC: these are not real Mimi tokens ***" if random else ""))
    lines.append(f"  tokenizer: {printable(meta['tokenizer'], 500)}")
    lines.append(f"  vocabulary: {layout.size} ids, fingerprint "
                 f"{printable(meta['vocab_fingerprint'], 200)}")
    if not 0 <= sample < len(source):
        raise DatasetError(f"--sample {sample} is outside the {split} split's 0..{len(source) - 1}")
    tokens, _ = source.get(sample)
    text_tokenizer, note = _tokenizer(meta, tokenizer)
    lines.append(f"\ndocument {sample} of {split}:")
    lines.append("  " + render_document(tokens, layout, text_tokenizer))
    if note:
        lines.append(f"  ({note})")
    if wav is not None:
        codes = first_audio_codes(tokens, layout)
        if codes is None:
            lines.append("  (no audio in this document: no WAV written)")
        else:
            codec_model = _decoder(root, codec or {}, mimi_weights, codes.shape[0])
            audio = codec_model.decode(codes)
            write_wav(Path(wav), audio, codec_model.sample_rate)
            lines.append(f"  wrote {wav}: {codes.shape[1] / codec_model.frame_rate:.2f} s decoded "
                         f"from {codes.shape[0]} codebooks"
                         + (" (random-init codec: expect noise)" if codec_model.random_init else ""))
    return "\n".join(lines)


def verify_dataset(root: str | Path, cache_dir: str | None = None,
                   max_listed: int = 20, budget: dict | None = None) -> tuple[str, int]:
    """Check every shard (against the index's hashes when present) and every document (ids in
    the dataset's vocabulary layout, masks in {0, 1}, lengths as ``doc_lengths.npy`` says) of
    both splits. Returns (report, number of problems); each problem is named by split, shard
    and document."""
    from soda_mega.data.read.cache import NodeCache

    lines = [f"verify {root}"]
    problems: list[str] = []
    found = 0
    for name in SPLITS:
        try:
            src = DocumentSource(root, name, cache=NodeCache(cache_dir) if cache_dir else None,
                                 **(budget or {}))
        except MissingSplitError as err:
            lines.append(f"  {name}: {'empty' if isinstance(err, EmptySplitError) else 'absent'} ({err})")
            continue
        except DatasetError as err:
            problems.append(f"{name}: {err}")
            continue
        found += 1
        hashed = sum(1 for s in src.shards if s["raw_data"].get("hashes"))
        bad_before = len(problems)
        meta = src.meta
        if meta.get("num_docs") != len(src):
            problems.append(f"{name}: soda_meta.json says {meta.get('num_docs')} documents, "
                            f"doc_lengths.npy holds {len(src)}")
        total = int(meta.get("tokens", {}).get("total", src.num_tokens))
        if total != src.num_tokens:
            problems.append(f"{name}: soda_meta.json says {total} tokens, doc_lengths.npy sums "
                            f"to {src.num_tokens}")
        for shard in range(len(src.shards)):
            try:
                src.local_shard(shard, rehash=True)  # a cached copy is hashed again
            except DatasetError as err:
                problems.append(f"{name}: {err}")
                continue
            for idx in range(src._starts[shard], src._starts[shard + 1]):
                try:
                    src.get(idx)
                except DatasetError as err:
                    problems.append(f"{name}: {err}".replace(
                        "; set data.skip_bad_documents=true to skip bad documents", ""))
        lines.append(f"  {name}: {len(src.shards)} shards ({hashed} with hashes, checked), "
                     f"{len(src)} documents, {src.num_tokens:,} tokens: "
                     + ("OK" if len(problems) == bad_before else
                        f"{len(problems) - bad_before} problem(s)"))
        src.close()
    if not found and not problems:
        problems.append(f"{root} holds no split (train/ or valid/)")
    for p in problems[:max_listed]:
        lines.append(f"  BAD {printable(p)}")
    if len(problems) > max_listed:
        lines.append(f"  ... and {len(problems) - max_listed} more")
    lines.append("verify: " + ("OK" if not problems else f"{len(problems)} problem(s) found"))
    return "\n".join(lines), len(problems)
