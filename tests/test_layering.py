"""The layering: decoding and the model layer never need the trainer; one constructor builds every model."""

import ast
import os
import subprocess
import sys

import pytest

from llm_jax import config as config_lib
from llm_jax import modeling
from llm_jax.errors import UserError
from llm_jax.model import PRESETS, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The bottom layer and inference: none of these may import llm_jax.train (or anything that does).
BELOW_TRAINING = [
  "llm_jax/inference",
  "llm_jax/modeling.py",
  "llm_jax/sequences.py",
  "llm_jax/model.py",
  "llm_jax/checkpoint.py",
  "llm_jax/sharding.py",
  "llm_jax/tokenizer.py",
  "llm_jax/chat.py",
]


def _python_files(path):
  full = os.path.join(ROOT, path)
  if os.path.isfile(full):
    return [full]
  return [os.path.join(full, f) for f in sorted(os.listdir(full)) if f.endswith(".py")]


def test_no_module_below_training_imports_the_trainer():
  offenders = []
  for path in BELOW_TRAINING:
    for file in _python_files(path):
      for node in ast.walk(ast.parse(open(file).read())):
        names = (
          [a.name for a in node.names]
          if isinstance(node, ast.Import)
          else [node.module or ""]
          if isinstance(node, ast.ImportFrom)
          else []
        )
        offenders += [f"{os.path.relpath(file, ROOT)}: {n}" for n in names if n.startswith("llm_jax.train")]
  assert not offenders, offenders


def test_importing_inference_leaves_the_trainer_unimported():
  code = (
    "import sys, llm_jax.inference.sampler, llm_jax.inference.loading, llm_jax.modeling, llm_jax.sequences\n"
    "loaded = sorted(m for m in sys.modules if m.startswith('llm_jax.train'))\n"
    "assert not loaded, loaded\n"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr


def test_build_model_is_keyed_by_the_family_field():
  from flax import nnx

  assert modeling.MODEL_FAMILIES == {"transformer": Transformer}
  assert isinstance(modeling.build_model(PRESETS["tiny"], nnx.Rngs(0)), Transformer)
  with pytest.raises(UserError, match="model.family='mamba' must be one of"):
    config_lib.validate_model_config(PRESETS["tiny"].__class__(family="mamba"))
