"""Train a model from scratch: `python train.py --model-name vgg11_bn --dataset fashion-mnist`
(= `intrafusion train`)."""
from intrafusion.cli import train_main

if __name__ == "__main__":
    raise SystemExit(train_main())
