"""Tasks: the data, judges, evaluations and drivers of particular experiments, kept out of the generic library.

`llm_jax.tasks.world_facts` is the project's built-in experiment (a generated corpus about 163 countries, the chats,
preference pairs and prompts about them, a gold judge, and the end-to-end driver). The generic modules (`llm_jax.data`,
`llm_jax.train`, `llm_jax.evaluation`, ...) never import a task; the one place where the library reaches a task is
`builtin_corpus` below.
"""

from __future__ import annotations

import os


def builtin_corpus(workdir: str, seed: int, num_documents: int) -> str:
  """The pretraining stage's default corpus (empty `data.path`): the world-facts corpus, written into the workdir.

  This is the one hook from the generic library into a task. Pretraining must run on a fresh machine with no
  downloads, so it needs a corpus the project generates itself; the stage calls this function instead of importing
  the task, and the task is imported only when the default is used.

  Args:
    workdir: The pretraining workdir; the corpus goes to WORKDIR/data/builtin_corpus.jsonl.
    seed: `data.builtin_seed`.
    num_documents: `data.builtin_documents`.

  Returns:
    The corpus path. An existing file is kept, so a resumed run reads the corpus it started with.
  """
  path = os.path.join(workdir, "data", "builtin_corpus.jsonl")
  if not os.path.exists(path):
    from llm_jax.tasks.world_facts import corpus  # Only when the default is used (see above).

    corpus.write_pretraining_jsonl(path, seed=seed, num_documents=num_documents)
  return path
