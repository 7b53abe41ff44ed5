"""Special tokens and chat templates as tokenizer data: Hugging Face tokenizers, Jinja templates with exact
assistant-only masks (ChatML, Llama 3), workdir round trips, and export to Hugging Face tokenizer files."""

import json
import os
import shutil

import numpy as np
import pytest
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from llm_jax import chat as chat_lib
from llm_jax.chat import Message
from llm_jax.data import text
from llm_jax.errors import UserError
from llm_jax.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, train_sentencepiece
from llm_jax.tokenizer_export import PROJECT_CHAT_TEMPLATE, bytes_to_unicode, export_hf_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")

CHATML = (
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
  "{% set loop_messages = messages %}{% for message in loop_messages %}"
  "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
  " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
  "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
TEXTS = ["", " ", "  two  spaces ", "Hello world", "a\n\nb\tc", "Digits 1234567 and 3.14159", "café 北京 🙂 Ω", "ŋ ⁂"]


def byte_hf_dir(path, specials, config, generation=None, bos=None):
  """A Hugging Face tokenizer directory: one token per UTF-8 byte (ids 0-255), then `specials` (256, 257, ...).

  Every ASCII character is exactly one token, so masks can be computed by hand."""
  vocab = {char: b for b, char in bytes_to_unicode().items()}
  fast = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  fast.decoder = decoders.ByteLevel()
  fast.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
  if bos:
    fast.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 256)])
  os.makedirs(path, exist_ok=True)
  fast.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  if generation is not None:
    with open(os.path.join(path, "generation_config.json"), "w") as f:
      json.dump(generation, f)
  return HFTokenizer.from_hf_dir(str(path))


@pytest.fixture
def chatml(tmp_path):
  """Qwen2-style: no BOS, <|im_end|> ends a turn, generation_config stops at <|im_end|> and <|endoftext|>."""
  config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML, "bos_token": None}
  return byte_hf_dir(
    tmp_path / "chatml", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], config, {"eos_token_id": [258, 256]}
  )


@pytest.fixture
def llama3(tmp_path):
  """Llama 3 style: BOS by default (post-processor), <|eot_id|> ends a turn, the template in chat_template.jinja."""
  specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
  config = {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|end_of_text|>", "special": True}}
  path = tmp_path / "llama3"
  os.makedirs(path)
  (path / "chat_template.jinja").write_text(LLAMA3)
  return byte_hf_dir(path, specials, config, {"eos_token_id": [257, 260]}, bos="<|begin_of_text|>")


def ascii_ids(s):
  return list(s.encode("ascii"))


def test_hf_tokenizer_special_tokens_are_data(chatml, llama3):
  assert (chatml.bos_id, chatml.eos_id, chatml.pad_id, chatml.add_bos) == (None, 258, 256, False)
  assert chatml.stop_ids == (258, 256) and chatml.special_ids == frozenset({256, 257, 258})
  assert chatml.encode_default("hi") == ascii_ids("hi") and chatml.chat_template == CHATML
  assert (llama3.bos_id, llama3.eos_id, llama3.add_bos, llama3.stop_ids) == (256, 257, True, (257, 260))
  assert llama3.encode_default("hi") == [256, *ascii_ids("hi")] and llama3.encode("hi") == ascii_ids("hi")
  assert llama3.chat_template == LLAMA3  # From chat_template.jinja.
  # As transformers does, special-token strings in text are the special tokens.
  assert chatml.encode("a<|im_end|>b") == [97, 258, 98]
  assert chatml.decode([97, 258, 98]) == "ab"


def test_chatml_mask_equals_hand_computed_mask(chatml):
  chat = (Message("system", "S"), Message("user", "hi"), Message("assistant", "yo"), Message("user", "x"))
  chat += (Message("assistant", "ok!"),)
  tokens, mask = chat_lib.render(chatml, chat)
  start, end, nl = 257, 258, 10
  expected = []
  expected_mask = []
  for message in chat:
    head = [start, *ascii_ids(message.role + "\n")]
    body = [*ascii_ids(message.content), end]
    expected += head + body + [nl]
    trained = int(message.role == "assistant")
    expected_mask += [0] * len(head) + [trained] * len(body) + [0]  # The newline after <|im_end|> is not trained.
  assert tokens == expected and mask == expected_mask
  prompt, prompt_mask = chat_lib.render(chatml, chat[:4], generation_prompt=True)
  assert prompt[-11:] == [start, *ascii_ids("assistant\n")]
  assert prompt_mask == expected_mask[: len(prompt) - 11] + [0] * 11
  assert tokens[: len(prompt)] == prompt  # The answer continues the generation prompt.
  assert chat_lib.answer_stop_ids(chatml) == (256, 258)
  assert chat_lib.banned_in_answers(chatml) == (257,)


def test_llama3_mask_equals_hand_computed_mask(llama3):
  chat = (Message("user", "Hi"), Message("assistant", " Yes. "), Message("user", "Q"), Message("assistant", "A"))
  tokens, mask = chat_lib.render(llama3, chat)
  bos, header, header_end, eot = 256, 258, 259, 260
  expected, expected_mask = [bos], [0]
  for message in chat:
    head = [header, *ascii_ids(message.role), header_end, *ascii_ids("\n\n")]
    body = [*ascii_ids(message.content.strip()), eot]  # The template trims the content.
    expected += head + body
    expected_mask += [0] * len(head) + [int(message.role == "assistant")] * len(body)
  assert tokens == expected and mask == expected_mask
  assert chat_lib.answer_stop_ids(llama3) == (257, 260)
  sampling = chat_lib.chat_sampling(chat_lib_sampling(), llama3)
  assert sampling.stop_ids == (257, 260) and sampling.banned_ids == (256, 258, 259)
  response, start = chat_lib.render_response(llama3, chat[:3], "A")
  assert response == tokens and start == len(tokens) - 2  # "A" and <|eot_id|>.


def chat_lib_sampling():
  from llm_jax.inference.sampler import SamplingConfig

  return SamplingConfig(temperature=1.0)


def test_project_tokenizers_keep_their_template_and_ids():
  tokenizer = ByteTokenizer()
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.stop_ids, tokenizer.add_bos) == (
    0,
    2,
    3,
    (3,),
    True,
  )
  assert tokenizer.chat_template is None and tokenizer.special_ids == frozenset(range(8))
  tokens, mask = chat_lib.render(tokenizer, (Message("user", "a"), Message("assistant", "b")))
  assert tokens == [2, 5, 8 + 97, 7, 6, 8 + 98, 7] and mask == [0, 0, 0, 0, 0, 1, 1]
  assert chat_lib.render_response(tokenizer, (Message("user", "a"),), "b") == (tokens, 5)


def test_a_tokenizer_without_a_chat_template_refuses_chat(tmp_path):
  gpt2 = byte_hf_dir(tmp_path / "gpt2", ["<|endoftext|>"], {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"})
  assert gpt2.bos_id == gpt2.eos_id == 256 and not gpt2.add_bos
  with pytest.raises(UserError, match="no chat template"):
    chat_lib.render(gpt2, (Message("user", "a"),), generation_prompt=True)
  # Pretraining frames a document as the model's tokenizer does: no BOS, EOS after it.
  rows = text.pack_documents([gpt2.encode("ab")], gpt2, seq_len=2)
  assert rows["inputs"].tolist() == [[97, 98]] and rows["targets"].tolist() == [[98, 256]]


def test_a_template_whose_prompt_is_not_a_prefix_is_refused(tmp_path):
  template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}PROMPT{% endif %}"
  config = {"eos_token": "<|im_end|>", "chat_template": template}
  tokenizer = byte_hf_dir(tmp_path / "bad", ["<|im_end|>"], config)
  with pytest.raises(UserError, match="not a prefix"):
    chat_lib.render(tokenizer, (Message("user", "a"), Message("assistant", "b")))


def test_bad_tokenizer_files_raise_one_line_naming_file_and_field(tmp_path, chatml):
  with pytest.raises(UserError, match="no tokenizer.json or tokenizer.model"):
    HFTokenizer.from_hf_dir(str(tmp_path))
  broken = tmp_path / "broken"
  shutil.copytree(chatml.source, broken)
  (broken / "tokenizer_config.json").write_text("{not json")
  with pytest.raises(UserError, match=r"broken/tokenizer_config.json: unreadable JSON"):
    HFTokenizer.from_hf_dir(str(broken))
  (broken / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<|im_end|>"}))
  with pytest.raises(UserError, match=r"tokenizer_config.json: field 'bos_token' = '<s>' is not in the vocabulary"):
    HFTokenizer.from_hf_dir(str(broken))
  (broken / "tokenizer.json").write_text("[]")
  with pytest.raises(UserError, match=r"broken/tokenizer.json: unreadable tokenizer"):
    HFTokenizer.from_hf_dir(str(broken))


def test_hf_tokenizer_round_trips_through_a_workdir(tmp_path, llama3, chatml):
  llama3.save(str(tmp_path / "work"))
  assert json.loads((tmp_path / "work" / "tokenizer.json").read_text()) == {"kind": "hf", "dir": "hf_tokenizer"}
  loaded = load_tokenizer(str(tmp_path / "work"))
  assert loaded.fingerprint() == llama3.fingerprint() != chatml.fingerprint()
  chat = (Message("user", "Hi"), Message("assistant", "Yes"))
  assert chat_lib.render(loaded, chat) == chat_lib.render(llama3, chat)
  for attribute in ("bos_id", "eos_id", "pad_id", "stop_ids", "add_bos", "special_ids", "chat_template"):
    assert getattr(loaded, attribute) == getattr(llama3, attribute), attribute
  assert all(loaded.encode_default(t) == llama3.encode_default(t) for t in TEXTS)
  # A different vocabulary (one merge more) has a different fingerprint.
  spec = json.loads((tmp_path / "work" / "hf_tokenizer" / "tokenizer.json").read_text())
  spec["model"]["vocab"]["Hi"] = 261
  spec["model"]["merges"] = [["H", "i"]]
  (tmp_path / "work" / "hf_tokenizer" / "tokenizer.json").write_text(json.dumps(spec))
  changed = load_tokenizer(str(tmp_path / "work"))
  assert changed.encode("Hi") == [261] and changed.fingerprint() != llama3.fingerprint()


def spm_corpus():
  rng = np.random.default_rng(0)
  words = ["the", "capital", "of", "France", "is", "Paris", "1234", "naïve", "日本語", "  ", "\n", "x"]
  return [" ".join(rng.choice(words, rng.integers(3, 30))) for _ in range(300)]


@pytest.fixture(scope="module")
def spm_tokenizer():
  return train_sentencepiece(spm_corpus(), 400)


@pytest.mark.parametrize("kind", ["char", "spm"])
def test_exported_tokenizer_json_gives_our_ids(kind, tmp_path, spm_tokenizer):
  """With the tokenizers library alone: the exported files give encode/encode_default's ids, and the exported
  Jinja template renders the project's template exactly (ids and mask)."""
  ours = ByteTokenizer() if kind == "char" else spm_tokenizer
  written = export_hf_tokenizer(ours, str(tmp_path))
  assert written == ["tokenizer.json", "tokenizer_config.json"]
  fast = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
  for t in TEXTS + spm_corpus()[:40]:
    assert fast.encode(t, add_special_tokens=False).ids == ours.encode(t), t
    assert fast.encode(t).ids == ours.encode_default(t), t
    assert fast.decode(ours.encode(t)) == ours.decode(ours.encode(t)), t
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["chat_template"] == PROJECT_CHAT_TEMPLATE
  imported = HFTokenizer.from_hf_dir(str(tmp_path))
  assert (imported.bos_id, imported.eos_id, imported.pad_id, imported.add_bos) == (2, 3, 0, True)
  chat = (Message("system", "Be brief."), Message("user", "2 + 2?"), Message("assistant", "4, naïvely 日本語."))
  assert chat_lib.render(imported, chat) == chat_lib.render(ours, chat)
  assert chat_lib.render(imported, chat[:2], True) == chat_lib.render(ours, chat[:2], True)
  assert chat_lib.answer_stop_ids(imported) == chat_lib.answer_stop_ids(ours) == (3, 7)


@pytest.mark.parametrize("kind", ["char", "spm"])
def test_transformers_loads_the_export_with_the_same_ids(kind, tmp_path, spm_tokenizer):
  transformers = pytest.importorskip("transformers")
  ours = ByteTokenizer() if kind == "char" else spm_tokenizer
  export_hf_tokenizer(ours, str(tmp_path))
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  for t in TEXTS:
    assert theirs(t)["input_ids"] == ours.encode_default(t), t
  messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello 日本"}]
  ids = theirs.apply_chat_template(messages, tokenize=True, return_dict=False)
  assert ids == chat_lib.render(ours, [Message(**m) for m in messages])[0]


def fixture_dirs():
  return (
    sorted(d for d in os.listdir(FIXTURES) if os.path.isdir(os.path.join(FIXTURES, d)))
    if os.path.isdir(FIXTURES)
    else []
  )


@pytest.mark.parametrize("family", fixture_dirs() or ["(none)"])
def test_hf_fixtures_match_transformers_reference_ids(family):
  """encode/encode_default equal transformers' ids (add_special_tokens False/True), render equals
  apply_chat_template(tokenize=True), as recorded in the fixture's reference.json."""
  reference_path = os.path.join(FIXTURES, family, "reference.json")
  if not os.path.exists(reference_path):
    pytest.skip(f"no Hugging Face fixture at {FIXTURES}/{family}")
  tokenizer = HFTokenizer.from_hf_dir(os.path.join(FIXTURES, family))
  with open(reference_path) as f:
    reference = json.load(f)
  assert reference.get("tokenize"), "the fixture records no tokenizer reference"
  for case in reference["tokenize"]:
    assert tokenizer.encode(case["text"]) == case["ids_plain"], case["text"]
    assert tokenizer.encode_default(case["text"]) == case["ids"], case["text"]
  for case in reference.get("chat", []):
    messages = [Message(m["role"], m["content"]) for m in case["messages"]]
    ids, mask = chat_lib.render(tokenizer, messages, case["add_generation_prompt"])
    assert ids == case["ids"], case["text"]
    assert chat_lib.render_text(tokenizer, messages, case["add_generation_prompt"]) == case["text"]
    # One trained run per answer, each ending with the end-of-turn token.
    run_ends = [i for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
    assert len(run_ends) == sum(m.role == "assistant" for m in messages)
    assert all(ids[i] in chat_lib.answer_stop_ids(tokenizer) for i in run_ends)
