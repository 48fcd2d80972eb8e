"""Train the shipped language model, a Llama-style GQA decoder, on the python-stdlib corpus.

`nice -n 10 python train_lm.py` (the defaults are the shipped model's settings); the same command
resumes an interrupted run from models/python-stdlib/llama_gqa.state, and at the end writes
models/python-stdlib/llama_gqa/ (config.json, model.safetensors, tokenizer.json, metrics.json).
See intrafusion/experiments/lm_training.py."""
import argparse
import dataclasses
import shlex
import sys

import torch

from intrafusion.errors import IntraFusionError
from intrafusion.experiments.lm_training import DEFAULT_OUT, LMSettings, train_language_model


def parse(argv):
    d = LMSettings()
    p = argparse.ArgumentParser(prog="train_lm.py", description=__doc__.splitlines()[0])
    model = p.add_argument_group("model")
    model.add_argument("--hidden-size", type=int, default=d.hidden_size)
    model.add_argument("--num-hidden-layers", type=int, default=d.num_hidden_layers)
    model.add_argument("--num-attention-heads", type=int, default=d.num_attention_heads, help="query heads")
    model.add_argument("--num-key-value-heads", type=int, default=d.num_key_value_heads,
                       help="key/value heads shared by the query heads (grouped-query attention)")
    model.add_argument("--intermediate-size", type=int, default=d.intermediate_size, help="SwiGLU width")
    model.add_argument("--vocab-size", type=int, default=d.vocab_size, help="BPE tokenizer entries")
    model.add_argument("--context", type=int, default=d.context, help="tokens per window")
    training = p.add_argument_group("training")
    training.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per step")
    training.add_argument("--steps", type=int, default=d.steps, help="total steps, fixed up front")
    training.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    training.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    training.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                          help="the cosine decay's final learning rate as a fraction of --lr")
    training.add_argument("--weight-decay", type=float, default=d.weight_decay)
    training.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    training.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (resume state: <out>.state)")
    p.add_argument("--corpus-root", default=None, help="folder of .py files (default: this Python's stdlib)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (1: two threads on busy shared cores ran 10x slower)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--save-seconds", type=float, default=180.0, help="write the resume state this often")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    torch.set_num_threads(args.threads)
    try:
        settings = LMSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LMSettings)})
        train_language_model(settings, args.out, args.corpus_root,
                             command=shlex.join(["python", "train_lm.py", *argv]),
                             log_every=args.log_every, eval_every=args.eval_every,
                             save_seconds=args.save_seconds, log=lambda line: print(line, flush=True))
    except IntraFusionError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last saved state", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
