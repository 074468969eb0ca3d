"""On-disk contract between the dataset builder and the loader.

A built dataset is a folder with one MDS dataset per split::

    <root>/train/index.json, shard.*.mds     (mosaicml-streaming MDSWriter output)
    <root>/train/soda_meta.json              (see META_KEYS)
    <root>/train/doc_lengths.npy             (int64, tokens per sample, in MDS sample order)
    <root>/valid/...                         (same; recordings never appear in both splits:
                                              data/write/splits.py; may hold no documents)

Each MDS sample is one document (BOS ... EOS) with the columns of :data:`MDS_COLUMNS`.
``doc_lengths.npy`` lets the loader plan packing and mixing from lengths alone and read only
the documents of its own rank.
"""

from __future__ import annotations

FORMAT = "soda-mega/1"
SPLITS = ("train", "valid")

MDS_COLUMNS = {
    "tokens": "ndarray:int32",     # token ids of the whole document, BOS first, EOS last
    "loss_mask": "ndarray:uint8",  # 1 where the token counts in the loss (same length as tokens)
    "doc_type": "str",             # one of DOC_TYPES
    "record_id": "str",            # source recording / text id (for provenance and splits)
}
# Hash algorithms MDSWriter records per shard file in index.json (streaming checks them on read).
SHARD_HASHES = ("xxh64",)
META_FILE = "soda_meta.json"
LENGTHS_FILE = "doc_lengths.npy"

DOC_TYPES = ("audio_first", "text_first", "speech_only", "semantic_only", "text_only", "s2st")

# soda_meta.json keys (all required):
#   format            FORMAT
#   split             "train" | "valid"
#   kind              "speech" | "text" | "s2st"   (mixture group: "text", or speech for the others)
#   vocab_layout      VocabLayout.to_dict();  vocab_fingerprint: VocabLayout.fingerprint()
#   codec             {"name", "sample_rate", "frame_rate", "num_codebooks", "codebook_size",
#                      "weights" (path or null), "weights_sha256" (or null),
#                      "random_init" (true when no weights were given: never real tokens)}
#                     or null for text-only datasets
#   tokenizer         {"kind": "byte" | "hf", "path", "sha256"}
#   num_docs          int;  doc_types: {doc_type: count}
#   tokens            {"total", "text", "special", "semantic", "acoustic"} token counts
#   audio_hours       float (0 for text)
#   skipped           [{"record": id, "reason": text}] bad inputs that were skipped
META_KEYS = ("format", "split", "kind", "vocab_layout", "vocab_fingerprint", "codec", "tokenizer",
             "num_docs", "doc_types", "tokens", "audio_hours", "skipped")
