"""The bodies of the stages: training (sft, dpo, distill and the plumbing they share), teacher-logit
capture, evaluation and merging. Everything here may import torch, transformers, trl, lm-eval or
mergekit, so it is loaded only when a stage runs; stage declarations live in `posttrain.kinds`."""
