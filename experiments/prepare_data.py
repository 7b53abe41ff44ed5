"""Tokenize and pack a corpus once into ArrayRecord shards, for pretraining at scale (llm_jax/data/prepared.py).

  python experiments/prepare_data.py --input='/data/web/*.parquet,/data/books/*.jsonl' --output=/data/prepared \
    --tokenizer=spm --vocab_size=32000 --seq_len=2048 --num_shards=64 --num_workers=16
  python experiments/pretrain.py --workdir=/tmp/run --config.data.path=/data/prepared --config.seq_len=2048

Inputs (comma-separated globs): text files (a document each), JSONL (`text` field), Parquet (`text` column).
--tokenizer: "char", "spm" (trained on the first --spm_sample_mb MB of the corpus) or a workdir that holds a
tokenizer (a trained or imported model: the run that continues it must see the same ids). Progress lines with
ETA go to stderr. Interrupted? Run the same command again: finished chunks and shards are kept. A finished
preparation is not redone. `--verify` checks every shard's checksum instead of preparing.
"""

import sys

from absl import app, flags

flags.DEFINE_string("input", None, "Comma-separated files or globs: .txt (any other name), .jsonl, .parquet.")
flags.DEFINE_string("output", None, "Directory for the shards, the tokenizer and prepared.json.")
flags.DEFINE_string("tokenizer", "spm", "'char', 'spm' (trained on a sample) or a workdir with a tokenizer.")
flags.DEFINE_integer("seq_len", 128, "Row length (the training run's config.seq_len).")
flags.DEFINE_integer("num_shards", 8, "ArrayRecord shards (contiguous row ranges).")
flags.DEFINE_integer("num_workers", 1, "Worker processes (tokenizing chunks, then writing shards).")
flags.DEFINE_integer("vocab_size", 2048, "For --tokenizer=spm.")
flags.DEFINE_float("spm_sample_mb", 20.0, "For --tokenizer=spm: MB of text (from the start) to train on.")
flags.DEFINE_float("chunk_mb", 64.0, "Input MB per tokenizing task (JSONL files are split at lines).")
flags.DEFINE_string("text_field", "text", "JSONL field / Parquet column holding the text.")
flags.DEFINE_bool("verify", False, "Only check the shards of --output against their checksums.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from llm_jax.data import prepared
  from llm_jax.errors import UserError

  def run():
    if not FLAGS.output:
      raise UserError("--output: give a directory")
    if FLAGS.verify:
      prepared.verify(FLAGS.output)
      print(f"{FLAGS.output}: every shard matches its checksum")
      return
    if not FLAGS.input:
      raise UserError("--input: give files or globs")
    result = prepared.prepare(
      FLAGS.input,
      FLAGS.output,
      FLAGS.tokenizer,
      seq_len=FLAGS.seq_len,
      num_shards=FLAGS.num_shards,
      num_workers=FLAGS.num_workers,
      vocab_size=FLAGS.vocab_size,
      spm_sample_mb=FLAGS.spm_sample_mb,
      chunk_mb=FLAGS.chunk_mb,
      text_field=FLAGS.text_field,
    )
    m = result.metadata
    print(
      f"{FLAGS.output}: {m['num_documents']:,} documents, {m['num_tokens']:,} tokens, {m['num_rows']:,} rows of "
      f"{m['seq_len']} in {len(m['shards'])} shards ({m['tokenizer']['kind']} tokenizer, vocab "
      f"{m['tokenizer']['vocab_size']}); tokenize {result.tokenize_seconds:.1f} s, pack {result.pack_seconds:.1f} s; "
      f"peak RSS {result.peak_rss_mb:.0f} MB"
    )
    sys.stdout.flush()

  try:  # Not cli.run: preparing needs no jax (nor its start-up time).
    run()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
