"""Loads an exported countdown model in transformers and answers one test question.

    python examples/countdown/generate_hf.py /tmp/countdown_hf

(docs/YOUR_TASK.md; the directory is what `python -m restem_jax.export --format hf` wrote.)
"""
import json
import os
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer


def main(model_dir: str) -> None:
  tokenizer = AutoTokenizer.from_pretrained(model_dir)
  model = AutoModelForCausalLM.from_pretrained(model_dir)
  with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "test.jsonl")) as f:
    row = json.loads(f.readline())
  prompt = f"Question: {row['question']}\nAnswer:"  # configs/jsonl_task.py's template
  inputs = tokenizer(prompt, return_tensors="pt")
  out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
  completion = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
  print(prompt + completion.split("\nQuestion:")[0])


if __name__ == "__main__":
  main(sys.argv[1])
