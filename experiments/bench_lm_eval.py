"""loglikelihood requests per second: the project's lm-eval model class vs lm-eval's own HF backend, side by side.

  python experiments/bench_lm_eval.py [--layers=4 --width=256 --requests=512 --batch_size=16]

Makes a random Llama checkpoint with transformers (the tokenizer of tests/fixtures/hf/llama2), imports it with
llm_jax.hf, and scores the same multiple-choice-style requests (world-facts contexts, 4 multi-token answers each)
with both backends on this CPU, float32. Our first pass compiles the buckets; it is timed apart. Needs torch,
transformers and accelerate besides the `eval` extra.
"""

import os
import sys
import tempfile
import time

# experiments/lm_eval.py is named like the package this imports: keep this directory off the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from absl import app, flags  # noqa: E402

from llm_jax import cli  # noqa: E402

flags.DEFINE_integer("layers", 4, "Decoder layers of the random Llama.")
flags.DEFINE_integer("width", 256, "Hidden size (heads of 64).")
flags.DEFINE_integer("requests", 512, "loglikelihood requests (contexts x 4 answers).")
flags.DEFINE_integer("batch_size", 16, "Batch size of both backends.")
flags.DEFINE_integer("threads", 0, "torch threads (0: torch's default).")
FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv):
  del argv

  def run():
    import random
    import shutil

    import jax
    import torch
    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from llm_jax import hf, sharding
    from llm_jax.inference import harness
    from llm_jax.tasks.world_facts import corpus

    if FLAGS.threads:
      torch.set_num_threads(FLAGS.threads)
    fixture = os.path.join(ROOT, "tests", "fixtures", "hf", "llama2")
    tmp = tempfile.mkdtemp()
    hf_dir, workdir = os.path.join(tmp, "hf"), os.path.join(tmp, "workdir")
    config = transformers.LlamaConfig(
      vocab_size=384,
      hidden_size=FLAGS.width,
      intermediate_size=FLAGS.width * 8 // 3 // 64 * 64,
      num_hidden_layers=FLAGS.layers,
      num_attention_heads=FLAGS.width // 64,
      num_key_value_heads=FLAGS.width // 64,
      max_position_embeddings=512,
      bos_token_id=1,
      eos_token_id=2,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir, safe_serialization=True)
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
      shutil.copy(os.path.join(fixture, name), hf_dir)
    mesh = sharding.make_mesh(-1, 1, 1)
    hf.import_checkpoint(hf_dir, workdir, sharding.make_mesh(1, 1, 1, jax.devices()[:1]), "float32")

    rng = random.Random(0)
    countries = list(corpus.COUNTRIES)
    requests = []
    while len(requests) < FLAGS.requests:
      country = rng.choice(countries)
      context = f"Facts about the world. The capital of {country.name} is"
      for answer in [country.capital] + [c.capital for c in rng.sample(countries, 3)]:
        requests.append(Instance("loglikelihood", {}, (context, " " + answer), len(requests)))
    requests = requests[: FLAGS.requests]

    ours = harness.load_lm(workdir, mesh, batch_size=FLAGS.batch_size)
    theirs = HFLM(pretrained=hf_dir, backend="causal", batch_size=FLAGS.batch_size, dtype="float32", device="cpu")
    start = time.perf_counter()
    ours.loglikelihood(requests)
    first = time.perf_counter() - start
    rates, answers = {}, {}
    for name, lm in (("llm_jax (JaxLM)", ours), ("lm-eval HF backend", theirs)):
      start = time.perf_counter()
      answers[name] = lm.loglikelihood(requests, disable_tqdm=True)
      rates[name] = len(requests) / (time.perf_counter() - start)
    diff = max(abs(a[0] - b[0]) for a, b in zip(*answers.values()))
    params = sum(p.numel() for p in transformers.LlamaForCausalLM(config).parameters())
    print(
      f"\nrandom Llama {FLAGS.layers} layers x {FLAGS.width} ({params / 1e6:.1f}M params), {len(requests)} requests, "
      f"batch {FLAGS.batch_size}, {len(jax.devices())} jax devices, torch threads {torch.get_num_threads()}"
    )
    print(f"{'backend':<22} {'requests/s':>12}")
    for name, rate in rates.items():
      print(f"{name:<22} {rate:>12.1f}")
    ratio = rates["llm_jax (JaxLM)"] / rates["lm-eval HF backend"]
    print(f"ratio {ratio:.2f}x; our first pass (with compilation) {first:.1f} s; max |log p diff| {diff:.2e}")
    shutil.rmtree(tmp, ignore_errors=True)

  cli.run(run)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
